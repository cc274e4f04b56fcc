"""Tracing and the access log, on real processes (`loopwise-connect serve ...`) exporting to an
OTLP/HTTP collector the test runs (services/dev/collector.py): one API call's spans form one
trace gateway → school API → PostgreSQL with correct parent links; the gateway sends its own
span as `traceparent` on public routes too; every log line of a request carries its trace
id; neither the access log nor the spans hold a token, a secret or a query's values; and the
gateway stays ready while identity is down."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from libs.common.config import Settings, load_settings
from services.dev.collector import Collector, Span, tree
from tests.support import free_port, running
from tests.test_gateway_support import World, make_world

pytestmark = pytest.mark.timeout(120)

CLI = str(Path(sys.executable).with_name("loopwise-connect"))


@dataclass
class Process:
    name: str
    port: int
    log: Path
    popen: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_bytes().splitlines():
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(line, dict):
                out.append(line)
        return out

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(name: str, port: int, log: Path, env: dict[str, str]) -> Process:
    """`loopwise-connect serve <name>` with `env` (and no OTEL_* of the test's own), its
    stderr (the JSON logs) to `log`."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    popen = subprocess.Popen(
        [CLI, "serve", name, "--port", str(port)],
        env={**inherited, **env},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    return Process(name, port, log, popen)


@dataclass
class System:
    env: dict[str, str]
    settings: Settings
    collector: Collector
    identity: Process
    school_api: Process
    gateway: Process

    @property
    def processes(self) -> list[Process]:
        return [self.identity, self.school_api, self.gateway]


@pytest.fixture(scope="module")
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    async with running(c.app(), free_port()) as url:
        c.url = url  # type: ignore[attr-defined]
        yield c


async def _ready(http: Any, process: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.popen.poll() is None, process.log.read_text()[-3000:]
        try:
            async with http.get(process.url + "/readyz") as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{process.name} not ready:\n{process.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def system_env(base_env: dict[str, str], collector: Any) -> dict[str, str]:
    gateway_port = free_port()
    identity_port = free_port()
    school_api_port = free_port()
    return {
        **base_env,
        "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{gateway_port}",
        "PLATFORM_URL": f"http://localhost:{gateway_port}",
        "GATEWAY_PORT": str(gateway_port),
        "IDENTITY_PORT": str(identity_port),
        "SCHOOL_API_PORT": str(school_api_port),
        "IDENTITY_URL": f"http://127.0.0.1:{identity_port}",
        "SCHOOL_API_URL": f"http://127.0.0.1:{school_api_port}",
        "WEBHOOKS_URL": f"http://127.0.0.1:{free_port()}",
        "LOG_LEVEL": "info",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        # Spans sent within a tenth of a second, not the default five.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.fixture(scope="module")
def processes(
    system_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, migrated: None
) -> Iterator[list[Process]]:
    logs = tmp_path_factory.mktemp("traced")
    started: list[Process] = []
    ports = {
        "identity": system_env["IDENTITY_PORT"],
        "school-api": system_env["SCHOOL_API_PORT"],
        "gateway": system_env["GATEWAY_PORT"],
    }
    try:
        for name, port in ports.items():
            started.append(spawn(name, int(port), logs / f"{name}.log", system_env))
        yield started
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture(scope="module")
async def system(
    system_env: dict[str, str], processes: list[Process], collector: Collector
) -> System:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for p in processes:
            await _ready(http, p)
    identity, school_api, gateway = processes
    return System(system_env, load_settings(system_env), collector, identity, school_api, gateway)


@pytest.fixture(scope="module")
async def world(system: System, pool: Any) -> World:
    return await make_world(
        pool, system.settings, "trace", system.gateway.port, scopes=("courses:read",)
    )


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def ancestors(span: Span, spans: list[Span]) -> list[Span]:
    index, chain = by_id(spans), []
    while span.parent_id in index:
        span = index[span.parent_id]
        chain.append(span)
    return chain


async def token_for(http: Any, system: System, world: World, header: str) -> str:
    import aiohttp

    async with http.post(
        system.gateway.url + "/v1/oauth/token",
        data={"grant_type": "client_credentials", "scope": "courses:read"},
        headers={
            "Host": world.host,
            "Authorization": aiohttp.encode_basic_auth(world.client.id, world.secret),
            "traceparent": header,
        },
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        token: str = body["access_token"]
        return token


async def test_one_api_call_is_one_trace_from_gateway_to_postgresql(
    system: System, world: World, http: Any
) -> None:
    header, _, _ = traceparent()
    token = await token_for(http, system, world, header)
    async with http.get(
        system.gateway.url + "/api/v1/courses",
        headers={"Host": world.host, "Authorization": f"Bearer {token}"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        request_id = resp.headers["X-Request-Id"]

    # The gateway's span of this call: the root of a trace of its own (no traceparent sent).
    collector = system.collector

    def gateway_root() -> Span | None:
        for s in collector.spans:
            if (
                s.service == "gateway"
                and s.kind == "SERVER"
                and s.name == "GET /api/v1/courses"
                and not s.parent_id
            ):
                return s
        return None

    async with asyncio.timeout(20):
        while gateway_root() is None:
            collector.changed.clear()
            await collector.changed.wait()
    root = gateway_root()
    assert root is not None

    def complete(spans: list[Span]) -> bool:
        return any(
            s.service == "school-api" and s.attributes.get("db.system") == "postgresql"
            for s in spans
        ) and any(s.service == "school-api" and s.kind == "SERVER" for s in spans)

    spans = await collector.wait_for(root.trace_id, complete)
    shown = tree(spans)
    # Shown with `pytest -s`: the README's captured trace is this print (a moment later, so
    # spans of identity's that the JWKS fetch made are in too).
    await asyncio.sleep(0.5)
    print(f"\ntrace {root.trace_id}\n{tree(collector.trace(root.trace_id))}")
    # gateway SERVER → gateway CLIENT (the lean client's span) → school-api SERVER → PostgreSQL
    server = next(s for s in spans if s.service == "school-api" and s.kind == "SERVER")
    forwarded = by_id(spans)[server.parent_id]
    assert forwarded.service == "gateway" and forwarded.kind == "CLIENT", shown
    assert forwarded.parent_id == root.span_id, shown
    queries = [
        s
        for s in spans
        if s.service == "school-api" and s.attributes.get("db.system") == "postgresql"
    ]
    for query in queries:
        assert server in ancestors(query, spans), shown
        assert query.kind == "CLIENT"
    assert (
        root.attributes.get("http.response.status_code", root.attributes.get("http.status_code"))
        == 200
    )

    # Every log line of the call carries its trace id: the access lines of both services.
    gateway_access = [
        line
        for line in system.gateway.lines()
        if line.get("event") == "access" and line.get("request_id") == request_id
    ]
    assert len(gateway_access) == 1
    assert gateway_access[0]["trace_id"] == root.trace_id
    assert gateway_access[0]["span_id"] == root.span_id
    assert gateway_access[0]["school"] == world.school.subdomain
    assert gateway_access[0]["status"] == 200
    assert gateway_access[0]["path"] == "/api/v1/courses"
    assert gateway_access[0]["method"] == "GET"
    assert gateway_access[0]["duration_ms"] > 0
    school_access = [
        line
        for line in system.school_api.lines()
        if line.get("event") == "access" and line.get("trace_id") == root.trace_id
    ]
    assert len(school_access) == 1, school_access
    assert school_access[0]["span_id"] == server.span_id
    assert school_access[0]["path"] == "/api/v1/courses"
    print(orjson.dumps(gateway_access[0]).decode())


async def test_a_public_route_continues_the_callers_trace_through_the_gateways_span(
    system: System, world: World, http: Any
) -> None:
    """The caller's traceparent is the parent of the gateway's span, and identity's span is a
    child of the gateway's client span: the gateway sends its own span, not the caller's
    header untouched."""
    header, trace_id, caller_span = traceparent()
    await token_for(http, system, world, header)

    def complete(spans: list[Span]) -> bool:
        return any(s.service == "identity" and s.kind == "SERVER" for s in spans) and any(
            s.service == "gateway" and s.kind == "SERVER" for s in spans
        )

    spans = await system.collector.wait_for(trace_id, complete)
    shown = tree(spans)
    gateway = next(s for s in spans if s.service == "gateway" and s.kind == "SERVER")
    assert gateway.parent_id == caller_span, shown
    identity = next(s for s in spans if s.service == "identity" and s.kind == "SERVER")
    assert identity.parent_id != caller_span, shown
    client = by_id(spans)[identity.parent_id]
    assert client.service == "gateway" and client.kind == "CLIENT", shown
    assert client.parent_id == gateway.span_id, shown
    # Identity's own work is in the same trace: its PostgreSQL calls under its span.
    assert any(
        s.service == "identity"
        and s.attributes.get("db.system") == "postgresql"
        and identity in ancestors(s, spans)
        for s in spans
    ), shown


async def test_no_token_secret_or_query_value_reaches_a_log_line_or_a_span(
    system: System, world: World, http: Any
) -> None:
    header, trace_id, _ = traceparent()
    token = await token_for(http, system, world, header)
    async with http.get(
        system.gateway.url + "/api/v1/courses",
        headers={"Host": world.host, "Authorization": f"Bearer {token}"},
    ) as resp:
        assert resp.status == 200
    query_secret = secrets.token_urlsafe(24)
    async with http.get(
        system.gateway.url + f"/v1/oauth/authorize?client_id={world.client.id}&code={query_secret}"
        f"&state={query_secret}",
        headers={"Host": world.host, "traceparent": header},
        allow_redirects=False,
    ) as resp:
        await resp.read()

    def complete(spans: list[Span]) -> bool:
        return any(
            s.service == "identity" and s.kind == "SERVER" and "authorize" in s.name for s in spans
        )

    spans = await system.collector.wait_for(trace_id, complete)
    access = [
        line
        for line in system.gateway.lines()
        if line.get("event") == "access" and line.get("trace_id") == trace_id
    ]
    assert {line["path"] for line in access} == {"/v1/oauth/token", "/v1/oauth/authorize"}
    exported = b"".join(system.collector.bodies)
    for secret in (token, world.secret, query_secret):
        for p in system.processes:
            assert secret not in p.log.read_text(), p.name
        assert secret.encode() not in exported
    # The URL attributes are there, without their query.
    assert any(
        str(s.attributes.get("url.full", s.attributes.get("http.url", ""))).endswith(
            "/v1/oauth/authorize"
        )
        for s in spans
    ), tree(spans)


async def test_the_access_log_can_be_turned_off(
    system_env: dict[str, str], tmp_path: Path, http: Any
) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    quiet = {**system_env, "ACCESS_LOG": "false", "OTEL_TRACES_EXPORTER": "none"}
    process = spawn("gateway", port, log, quiet)
    try:
        await _ready(http, process)
        async with http.get(process.url + "/healthz") as resp:
            assert resp.status == 200
    finally:
        process.stop()
    lines = process.lines()
    assert any(line.get("event") == "listening" for line in lines)
    assert not [line for line in lines if line.get("event") == "access"]
    assert not [line for line in lines if "trace_id" in line]


async def test_the_gateway_stays_ready_while_identity_is_down(system: System, http: Any) -> None:
    """Readiness is the gateway's own stores only: an identity outage must not take every
    gateway out of the load balancer. (Last in the module: identity stays stopped.)"""
    system.identity.stop()
    async with http.get(system.gateway.url + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert set(body["checks"]) >= {"postgresql", "redis"}

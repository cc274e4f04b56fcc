"""Property-based API fuzzing: every service against its own `/openapi.json`, for real.

Each service runs on a real socket (conftest), its document is fetched over HTTP, and
schemathesis fuzzes every operation with valid and invalid input, once with credentials that
reach the handlers and once with none. Every answer must hold:

- no 5xx;
- its content type is one the document names for that status;
- a JSON 4xx names the error in an `error` string (RFC 6749 5.2, RFC 6750 3);
- nothing the call carried as a credential (bearer token, client secret, registration token,
  internal token) comes back in the body or a header.

schemathesis speaks `requests`, which blocks, so each run goes to a worker thread: the session
event loop that serves identity, webhooks and the gateway keeps answering meanwhile. The seed is
fixed (derandomize) and each operation gets a small, fixed number of examples.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import hypothesis
import pytest
import redis.asyncio as redis_asyncio
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from libs.common.config import Settings, load_settings
from services.identity import schools, users
from services.identity.sessions import SESSION_COOKIE
from services.school_api import resources as school_resources
from services.school_api import seed as school_seed
from services.school_api import store as school_store
from services.school_api.identity import (
    CLIENT_HEADER,
    INTERNAL_TOKEN_HEADER,
    SCHOOL_HEADER,
    SCOPES_HEADER,
    SUBJECT_HEADER,
)
from tests import test_gateway_support as gw
from tests import token_helpers as tok
from tests.support import client_session, free_port, running
from tests.test_account_pages import sign_in
from tests.test_authorize import Browser

pytestmark = pytest.mark.timeout(180)

# Examples per operation: enough to hit every handler's validation paths with a fixed seed,
# few enough that the file stays well inside its time budget. Without credentials every call
# ends at the same check, so a few do; through the gateway the upstreams' handlers were fuzzed
# directly already, and what is left to exercise is the gateway's own layer on its 144 routes.
EXAMPLES = 20
UNAUTHENTICATED_EXAMPLES = 4
GATEWAY_EXAMPLES = 5


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass(frozen=True)
class Call:
    """What one operation's calls carry besides what schemathesis generates."""

    headers: dict[str, str] = field(default_factory=dict)
    path_parameters: dict[str, Any] = field(default_factory=dict)


CallFor = Callable[[APIOperation], Call]


def _json_body(response: Response) -> Any:
    content_type = response.headers.get("content-type", [""])[0]
    if "json" not in content_type.split(";")[0]:
        return None
    try:
        return response.json()
    except ValueError:
        raise AssertionError(
            f"{content_type} body is not JSON: {response.content[:200]!r}"
        ) from None


def rfc_error_shape(_ctx: CheckContext, response: Response, case: Case) -> None:
    """A JSON 4xx is an RFC 6749/6750 error: an object with a non-empty `error` string."""
    if not 400 <= response.status_code < 500:
        return
    body = _json_body(response)
    if body is None and "json" not in response.headers.get("content-type", [""])[0]:
        return
    if not (isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]):
        raise AssertionError(
            f"{case.operation.label} answered {response.status_code} with a JSON body that "
            f"names no `error`: {response.content[:300]!r}"
        )


def no_echo(sent: Sequence[str]) -> Callable[[CheckContext, Response, Case], None]:
    """No credential the call carried is repeated in the answer."""
    needles = [s for s in sent if len(s) >= 8]

    def check(_ctx: CheckContext, response: Response, case: Case) -> None:
        haystacks = [response.content or b""]
        haystacks += [v.encode() for values in response.headers.values() for v in values]
        for secret in needles:
            if any(secret.encode() in h for h in haystacks):
                raise AssertionError(
                    f"{case.operation.label} answered {response.status_code} echoing a "
                    f"credential the call sent ({secret[:6]}...)"
                )

    check.__name__ = "no_credential_echo"
    return check


@dataclass
class Outcome:
    operations: int = 0
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    succeeded: set[str] = field(default_factory=set)  # operations that answered a 2xx


def _fuzz_operation(
    operation: APIOperation,
    call: Call,
    base_url: str,
    session: requests.Session,
    outcome: Outcome,
    *,
    examples: int,
    extra_checks: list[Any],
    known_issue: Callable[[Case], bool],
) -> None:
    fixed = call.path_parameters or None
    modes = [
        operation.as_strategy(generation_mode=mode, path_parameters=fixed)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    # The document's own examples too: random text rarely makes a request a handler accepts.
    modes += operation.schema.get_strategies_from_examples(operation)

    @hypothesis.settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        # The first failing example is the report; shrinking would only cost time.
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=st.one_of(modes))
    def run(case: Case) -> None:
        hypothesis.assume(not known_issue(case))
        response = case.call(base_url=base_url, session=session, headers=call.headers)
        outcome.requests += 1
        outcome.statuses[response.status_code] += 1
        if 200 <= response.status_code < 300:
            outcome.succeeded.add(operation.label)
        case.validate_response(
            response,
            checks=CHECKS,
            additional_checks=extra_checks,
            headers=call.headers,
        )

    run()


def fuzz(
    document_url: str,
    base_url: str,
    call_for: CallFor,
    *,
    examples: int,
    credentials: Sequence[str] = (),
    known_issue: Callable[[Case], bool] = lambda _case: False,
) -> Outcome:
    """Fuzz every operation of the document at `document_url` against `base_url` (blocking)."""
    schema = schemathesis.openapi.from_url(document_url, timeout=10)
    schema.validate()  # a document that is not valid OpenAPI fails here, naming the problem
    extra = [rfc_error_shape, no_echo(credentials)]
    outcome = Outcome()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            outcome.operations += 1
            try:
                _fuzz_operation(
                    operation,
                    call_for(operation),
                    base_url,
                    session,
                    outcome,
                    examples=examples,
                    extra_checks=extra,
                    known_issue=known_issue,
                )
            # schemathesis reports check failures as a BaseExceptionGroup, not an Exception.
            except (Exception, BaseExceptionGroup) as exc:
                outcome.failures.append(f"{operation.label}: {exc}")
    return outcome


def _assert_clean(
    name: str,
    outcome: Outcome,
    *,
    succeeds: Sequence[str] = (),
    never_succeeds: str | None = None,
) -> None:
    assert outcome.operations > 0, f"{name}: the document has no operations"
    assert not outcome.failures, f"{name}: {len(outcome.failures)} operation(s) failed\n\n" + (
        "\n\n".join(outcome.failures)
    )
    # The credentials worked: these operations answered a 2xx at least once, so fuzzing got
    # past authentication into their handlers.
    missing = [label for label in succeeds if label not in outcome.succeeded]
    assert not missing, f"{name}: never succeeded: {missing} ({dict(outcome.statuses)})"
    if never_succeeds is not None:
        leaked = sorted(label for label in outcome.succeeded if never_succeeds in label)
        assert not leaked, f"{name}: succeeded without credentials: {leaked}"


def _plain(host: str | None = None) -> CallFor:
    headers = {"Host": host} if host else {}
    return lambda _op: Call(headers=dict(headers))


# Identity ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
async def _forget_throttles(redis: redis_asyncio.Redis, settings: Settings) -> AsyncIterator[None]:
    """Fuzzed sign-ins and registrations fill the address's throttles and rate limits; later
    tests of the run must not inherit them."""
    yield
    for pattern in ("connect:throttle:*", "connect:ratelimit:*"):
        keys = [k async for k in redis.scan_iter(match=settings.stream(pattern), count=1000)]
        if keys:
            await redis.delete(*keys)


@dataclass(frozen=True)
class IdentityWorld:
    host: str
    basic: str  # the confidential client's HTTP Basic credentials
    access_token: str
    session_cookie: str  # a school admin's, for the account and admin pages
    registrations: dict[tuple[str, str], tuple[str, str]]  # (method, path) -> (client, token)

    @property
    def credentials(self) -> tuple[str, ...]:
        return (
            self.basic.removeprefix("Basic "),
            self.access_token,
            self.session_cookie,
            *(token for _client, token in self.registrations.values()),
        )


_CLIENT_AUTH_PATHS = {"/v1/oauth/token", "/api/oauth/token", "/v1/oauth/revoke"}
_CLIENT_AUTH_PATHS |= {"/v1/oauth/introspect"}
_REGISTRATION_PATHS = ("/v1/oauth/register/{client_id}", "/api/oauth/register/{client_id}")
_PAGE_PREFIXES = ("/account/", "/admin/", "/v1/oauth/")


async def _register(http: aiohttp.ClientSession, origin: str) -> tuple[str, str]:
    metadata = {
        "client_name": "Fuzzed App",
        "redirect_uris": ["https://app.example/callback"],
        "token_endpoint_auth_method": "none",
    }
    async with http.post(origin + "/v1/oauth/register", json=metadata) as resp:
        body = await resp.json()
        assert resp.status == 201, body
    return body["client_id"], body["registration_access_token"]


@pytest.fixture(scope="module")
async def identity_world(
    identity_url: str, pool: Any, settings: Settings, identity_port: int
) -> IdentityWorld:
    world = await tok.make_world(pool, settings, secrets.token_hex(3), identity_port, label="fz")
    admin, _ = await users.create_user(
        pool,
        school_id=world.school.id,
        email=f"fuzz-admin-{secrets.token_hex(4)}@example.com",
        password=tok.PASSWORD,
        role="admin",
    )
    browser = Browser()
    try:
        status, _, body = await sign_in(browser, world.origin, admin.email)
        assert status == 303, body
        session_cookie = browser.cookie(SESSION_COOKIE)
        assert session_cookie
    finally:
        await browser.close()
    async with client_session() as http:
        answer, _grant = await tok.code_flow(
            http, pool, settings, world, scopes=("openid", "profile", "email", "read")
        )
        assert answer.status == 200, answer.body
        # A registered client per RFC 7592 operation: a fuzzed DELETE or PUT of one leaves
        # the others' credentials working.
        registrations = {
            (method, path): await _register(http, world.origin)
            for path in _REGISTRATION_PATHS
            for method in ("GET", "PUT", "DELETE")
        }
    return IdentityWorld(
        host=world.origin.removeprefix("http://"),
        basic=tok.basic(world.confidential.id, world.secret),
        access_token=answer.body["access_token"],
        session_cookie=session_cookie,
        registrations=registrations,
    )


def _identity_calls(world: IdentityWorld) -> CallFor:
    def call_for(operation: APIOperation) -> Call:
        headers = {"Host": world.host}
        registered = world.registrations.get((operation.method.upper(), operation.path))
        if registered is not None:
            client_id, token = registered
            headers["Authorization"] = f"Bearer {token}"
            return Call(headers, {"client_id": client_id})
        if operation.path in _CLIENT_AUTH_PATHS:
            headers["Authorization"] = world.basic
        elif operation.path == "/v1/oauth/userinfo":
            headers["Authorization"] = f"Bearer {world.access_token}"
        elif operation.path.startswith(_PAGE_PREFIXES):
            headers["Cookie"] = f"{SESSION_COOKIE}={world.session_cookie}"
        return Call(headers)

    return call_for


@pytest.fixture(scope="module")
async def fuzz_identity(
    identity_url: str, base_env: dict[str, str], webhooks_url: str
) -> AsyncIterator[str]:
    """Identity as the session runs it (same stores, same issuers: send their Host), but with
    the webhooks service of this run behind its admin webhooks pages."""
    from services.identity.app import create_app

    settings = load_settings({**base_env, "WEBHOOKS_URL": webhooks_url})
    async with running(create_app(settings), free_port()) as url:
        yield url


async def test_identity_survives_fuzzing_with_credentials(
    fuzz_identity: str, identity_world: IdentityWorld
) -> None:
    outcome = await asyncio.to_thread(
        fuzz,
        fuzz_identity + "/openapi.json",
        fuzz_identity,
        _identity_calls(identity_world),
        examples=EXAMPLES,
        credentials=identity_world.credentials,
    )
    _assert_clean(
        "identity",
        outcome,
        succeeds=(
            "GET /v1/oauth/userinfo",
            "GET /v1/oauth/register/{client_id}",
            "GET /admin/apps",
            "GET /admin/webhooks",
            "GET /account/apps",
        ),
    )


async def test_identity_survives_fuzzing_without_credentials(
    fuzz_identity: str, identity_world: IdentityWorld
) -> None:
    outcome = await asyncio.to_thread(
        fuzz,
        fuzz_identity + "/openapi.json",
        fuzz_identity,
        _plain(identity_world.host),
        examples=UNAUTHENTICATED_EXAMPLES,
    )
    _assert_clean("identity", outcome, never_succeeds="/register/{client_id}")


# The school API ---------------------------------------------------------------------------------


def _school_api_headers(settings: Settings, school_id: int) -> dict[str, str]:
    return {
        INTERNAL_TOKEN_HEADER: settings.internal_token,
        SCHOOL_HEADER: str(school_id),
        SUBJECT_HEADER: "fuzz-user",
        CLIENT_HEADER: "fuzz-client",
        SCOPES_HEADER: "read write",
    }


async def _seeded_rows(pool: Any, school_id: int) -> dict[str, list[int]]:
    """A school with the sample data; its row ids by resource name, oldest first."""
    assert await school_seed.seed_school(pool, school_id, "Fuzz School")
    rows: dict[str, list[int]] = {}
    for resource in school_resources.COLLECTIONS:
        found = await pool.fetch(
            f"SELECT id FROM {school_store.SCHEMA}.{resource.table}"
            " WHERE school_id = $1 ORDER BY id",
            school_id,
        )
        rows[resource.name] = [r["id"] for r in found]
    return rows


def _school_api_calls(headers: dict[str, str], rows: dict[str, list[int]]) -> CallFor:
    def call_for(operation: APIOperation) -> Call:
        # /api/v1/{name}/{id}...: a real row of the school, so updates reach validation and
        # nested collections their parent; DELETE takes the newest row, the others the oldest.
        parts = operation.path.split("/")
        ids = rows.get(parts[3], []) if len(parts) > 4 and parts[4] == "{id}" else []
        if not ids:
            return Call(dict(headers))
        row = ids[-1] if operation.method.upper() == "DELETE" else ids[0]
        return Call(dict(headers), {"id": row})

    return call_for


async def test_school_api_survives_fuzzing_with_the_gateways_identity(
    school_api_url: str, settings: Settings, pool: Any
) -> None:
    school_id = secrets.randbelow(2**40) + 10**6
    rows = await _seeded_rows(pool, school_id)
    outcome = await asyncio.to_thread(
        fuzz,
        school_api_url + "/openapi.json",
        school_api_url,
        _school_api_calls(_school_api_headers(settings, school_id), rows),
        examples=EXAMPLES,
        credentials=(settings.internal_token,),
    )
    _assert_clean(
        "school API",
        outcome,
        succeeds=(
            "GET /api/v1/courses",
            "GET /api/v1/courses/{id}",
            "GET /api/v1/courses/{id}/reviews",
            "GET /api/v1/settings",
        ),
    )


async def test_school_api_survives_fuzzing_without_identity(school_api_url: str) -> None:
    outcome = await asyncio.to_thread(
        fuzz,
        school_api_url + "/openapi.json",
        school_api_url,
        _plain(),
        examples=UNAUTHENTICATED_EXAMPLES,
    )
    _assert_clean("school API", outcome, never_succeeds=" /api/")


# Webhooks ---------------------------------------------------------------------------------------


async def _subscribe(http: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> str:
    async with http.post(
        base + "/api/v1/webhooks",
        json={"url": "http://127.0.0.1:9/fuzz", "event_types": ["course.updated"]},
        headers=headers,
    ) as resp:
        body = await resp.json()
        assert resp.status == 201, body
        return str(body["id"])


async def test_webhooks_survive_fuzzing_with_the_gateways_identity(
    webhooks_url: str, settings: Settings, http: aiohttp.ClientSession
) -> None:
    headers = {
        **_school_api_headers(settings, secrets.randbelow(2**40) + 10**6),
        "X-Connect-Grant-Id": str(uuid.uuid4()),
    }
    # A subscription of the caller's own per item operation, so fuzzing reaches past the 404
    # (and a fuzzed DELETE takes only its own).
    owned: dict[tuple[str, str], str] = {}
    async with http.get(webhooks_url + "/openapi.json") as resp:
        document = await resp.json()
    for path, item in document["paths"].items():
        if path.startswith("/api/v1/webhooks/{id}"):
            for method in item:
                if method != "parameters":
                    owned[(method.upper(), path)] = await _subscribe(http, webhooks_url, headers)

    def call_for(operation: APIOperation) -> Call:
        found = owned.get((operation.method.upper(), operation.path))
        return Call(dict(headers), {"id": found} if found else {})

    outcome = await asyncio.to_thread(
        fuzz,
        webhooks_url + "/openapi.json",
        webhooks_url,
        call_for,
        examples=EXAMPLES,
        credentials=(settings.internal_token,),
    )
    _assert_clean(
        "webhooks",
        outcome,
        succeeds=("GET /api/v1/webhooks", "GET /api/v1/webhooks/{id}", "POST /api/v1/webhooks"),
    )


async def test_webhooks_survive_fuzzing_without_identity(webhooks_url: str) -> None:
    outcome = await asyncio.to_thread(
        fuzz,
        webhooks_url + "/openapi.json",
        webhooks_url,
        _plain(),
        examples=UNAUTHENTICATED_EXAMPLES,
    )
    _assert_clean("webhooks", outcome, never_succeeds=" /api/")


# The gateway ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def fuzz_gateway(
    gateway_env: dict[str, str],
    gateway_identity_url: str,
    school_api_url: str,
    webhooks_url: str,
) -> AsyncIterator[str]:
    """A gateway of this run fronting the real school API and webhooks service."""
    async with gw.extra_gateway(
        gateway_env,
        SCHOOL_API_URL=school_api_url,
        WEBHOOKS_URL=webhooks_url,
        # Fuzzing is a burst far beyond any client's budget; 429s would hide the handlers.
        RATE_LIMIT_PER_MINUTE="1000000",
        RATE_LIMIT_BURST="1000000",
    ) as base:
        yield base


async def test_gateway_survives_fuzzing_with_a_real_token(
    fuzz_gateway: str,
    pool: Any,
    gateway_settings: Settings,
    gateway_port: int,
    http: aiohttp.ClientSession,
) -> None:
    world = await gw.make_world(pool, gateway_settings, "fz", gateway_port)
    token = (await gw.real_token(http, fuzz_gateway, world, scope="read write"))["access_token"]
    headers = {"Host": world.host, "Authorization": f"Bearer {token}"}
    outcome = await asyncio.to_thread(
        fuzz,
        fuzz_gateway + "/openapi.json",
        fuzz_gateway,
        lambda _op: Call(dict(headers)),
        examples=GATEWAY_EXAMPLES,
        credentials=(token, world.secret),
    )
    _assert_clean(
        "gateway", outcome, succeeds=("GET /api/v1/courses", "GET /api/v1/webhooks", "GET /healthz")
    )


async def test_gateway_survives_fuzzing_without_a_token(
    fuzz_gateway: str, pool: Any, gateway_settings: Settings, gateway_port: int
) -> None:
    school = await schools.create_school(
        pool, gateway_settings, f"gwfz{secrets.token_hex(3)}", "Gateway fuzz"
    )
    host = f"{school.subdomain}.localhost:{gateway_port}"
    outcome = await asyncio.to_thread(
        fuzz,
        fuzz_gateway + "/openapi.json",
        fuzz_gateway,
        _plain(host),
        examples=UNAUTHENTICATED_EXAMPLES,
    )
    _assert_clean("gateway", outcome, never_succeeds=" /api/")


async def test_gateway_answers_a_path_with_a_newline_in_json(
    fuzz_gateway: str, pool: Any, gateway_settings: Settings, gateway_port: int
) -> None:
    school = await schools.create_school(
        pool, gateway_settings, f"gwnl{secrets.token_hex(3)}", "Gateway newline"
    )
    host = f"{school.subdomain}.localhost:{gateway_port}"
    async with (
        client_session() as http,
        http.get(fuzz_gateway + "/api/v1/courses/a%0Ab", headers={"Host": host}) as resp,
    ):
        assert resp.status == 401, await resp.text()
        assert resp.content_type == "application/json"

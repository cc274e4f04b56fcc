"""`loopwise-connect dev` (what `make dev` runs): the whole system on one machine.

It finds PostgreSQL and Redis (DATABASE_URL/REDIS_URL, else the default local ports, else it
starts local ones under `.data/`: `localstores`), prepares the development database
(`database`: migrated, secrets checked, demo seeded), starts every part as its own process,
waits until each is ready, prints the URLs and the admin logins, and on Ctrl-C stops
everything it started. The school API it starts runs a gentle stream of demo storefront
activity (CONNECT_DEMO_ACTIVITY, every DEMO_ACTIVITY seconds unless set; `off` stops it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from libs.common.config import Settings, load_settings
from libs.common.logging import get_logger
from services.dev import database, localstores, seed

log = get_logger(__name__)

DATA_DIR = Path(".data")
# Seconds between the demo storefront actions under `make dev` (when not set otherwise).
DEMO_ACTIVITY = "5"


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    port: int


def parts(settings: Settings) -> list[Part]:
    """The processes to run; the gateway is the public origin (port 8080) in front of the rest."""
    return [
        Part("identity", settings.ports.identity),
        Part("school-api", settings.ports.school_api),
        Part("webhooks", settings.ports.webhooks),
        Part("gateway", settings.ports.gateway),
    ]


def _spawn(part: Part, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", part.name, "--port", str(part.port)],
        env=env,
        # A terminal Ctrl-C reaches the whole process group; children get SIGTERM from us so
        # that they finish their in-flight requests in order.
        start_new_session=True,
    )


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _wait_ready(
    children: dict[str, subprocess.Popen[bytes]], all_parts: list[Part], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    pending = {p.name: p.port for p in all_parts}
    while pending:
        for name, port in list(pending.items()):
            if children[name].poll() is not None:
                raise RuntimeError(f"{name} exited with code {children[name].returncode}")
            if _ready(port):
                del pending[name]
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(pending)}")
        time.sleep(0.1)


def _banner(settings: Settings, logins: list[seed.Login], started: float) -> str:
    urls = settings.urls
    lines = [
        "",
        f"Loopwise Connect is running (ready in {time.monotonic() - started:.1f}s).",
        "",
        f"  platform        {urls.platform_url}",
    ]
    for login in logins:
        origin = urls.school_origin(login.school)
        lines.append(f"  {login.school:<15} {origin}")
    demo = urls.school_origin("demo")
    lines += [
        "",
        f"  discovery       {demo}/.well-known/openid-configuration",
        f"  API             {demo}/api/v1/courses (with a Bearer token)",
        f"  webhook egress  {urls.platform_url}/v1/webhooks/egress-ips",
        f"  event types     {urls.platform_url}/v1/webhooks/event-types",
        f"  MCP             {urls.platform_url}/mcp",
        f"  your apps       {demo}/account/apps",
        f"  school admin    {demo}/admin/apps",
        "",
        "  storefront      "
        + (
            f"an action every ~{settings.demo_activity:g}s in the demo schools"
            " (CONNECT_DEMO_ACTIVITY=off to stop); `loopwise-connect storefront --help`"
            if settings.demo_activity
            else "no demo activity; `loopwise-connect storefront --help` to act by hand"
        ),
        "",
        f"  behind the gateway: identity :{settings.ports.identity},"
        f" school API :{settings.ports.school_api}, webhooks :{settings.ports.webhooks}",
        "",
        "Admin logins:",
    ]
    for login in logins:
        lines.append(f"  {login.school:<15} {login.email}  password: {login.password}")
    lines += ["", "Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


def _stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 25
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


def run(settings: Settings) -> int:
    started = time.monotonic()
    # A database named by DATABASE_URL is the user's: never started afresh here.
    own_database = not os.environ.get("DATABASE_URL")
    stores, stop_stores = localstores.find_or_start(DATA_DIR)
    env = {
        **os.environ,
        "DATABASE_URL": stores.database_url,
        "REDIS_URL": stores.redis_url,
        # Identity sits behind the gateway and takes the caller's address from it; nothing
        # stands in front of the gateway, so it trusts no forwarded header itself.
        "TRUST_FORWARDED_HOST": "true",
        "GATEWAY_TRUST_FORWARDED": "false",
        # A storefront action in a demo school every few seconds, so webhooks have something
        # to deliver; CONNECT_DEMO_ACTIVITY=off turns it off.
        "CONNECT_DEMO_ACTIVITY": os.environ.get("CONNECT_DEMO_ACTIVITY", DEMO_ACTIVITY),
    }
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        settings = load_settings(env)
        logins = asyncio.run(database.prepare(settings, own_database=own_database))
        all_parts = parts(settings)
        for part in all_parts:
            children[part.name] = _spawn(part, env)
        _wait_ready(children, all_parts)
        sys.stdout.write(_banner(settings, logins, started))
        sys.stdout.flush()
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    log.error("part_exited", part=name, code=child.returncode)
                    stopping = True
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        log.error("dev_failed", error=str(exc))
        return 1
    finally:
        sys.stdout.write("\nStopping...\n")
        _stop_children(children)
        stop_stores()
        sys.stdout.write("Stopped.\n")

"""`make bench` / `make bench-quick`: start the system, run issue 6's scenarios, print one row
per scenario (ours, the baseline from the same run, the ratio), write
bench/results/latest.json, and stop everything that was started.

    python -m bench            # the full run (under 10 minutes, with the node-oidc peer)
    python -m bench --quick    # the same scenarios, shorter (under 90 seconds, no peer)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

from bench import report, wrk
from bench.measure import Context
from bench.peer import Peer
from bench.plan import FULL, QUICK, Plan
from bench.procs import BenchError
from bench.report import Row, failed_row
from bench.scenarios import gateway, memory, revocation, tokens, validation, webhooks
from bench.world import System, World, cleanup, make_system, prepare_database, seed, user_tokens

RESULTS = Path(__file__).resolve().parent / "results"


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def start_services(system: System) -> None:
    p = system.ports
    for part, port, name in (
        ("identity", p.identity, "identity"),
        ("school-api", p.school_api, "school-api"),
        ("webhooks", p.webhooks, "webhooks"),
        ("gateway", p.gateway, "gateway"),
        ("gateway", p.gateway2, "gateway-2"),
    ):
        system.service(part, port, name)
    system.helper(
        "bench.bare_proxy", "bare-proxy", p.bare_proxy, "--upstream", system.url(p.school_api)
    )
    system.helper("bench.receiver", "receiver", p.receiver)
    for name in ("identity", "school-api", "webhooks", "gateway", "gateway-2"):
        system.procs.by_name(name).wait_http("/readyz", timeout=60)
    system.procs.by_name("receiver").wait_http("/healthz", timeout=30)
    _wait_port(system, system.ports.bare_proxy)


def _wait_port(system: System, port: int) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"nothing listens on {port}:\n{system.procs.by_name('bare-proxy').tail()}")


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return claims


async def warm_up(ctx: Context) -> None:
    """Every endpoint the scenarios use, briefly, so no measured run pays a first call."""
    s, w = ctx.system, ctx.world
    say(f"warm-up ({ctx.plan.warmup_s:g}s per endpoint)")
    await ctx.wrk(
        "warm-up gateway",
        s.url(s.ports.gateway),
        "static.lua",
        duration=ctx.plan.warmup_s,
        connections=ctx.plan.connections,
        groups={},
        env={
            "BENCH_HOST": s.host,
            "BENCH_PATH": "/api/v1/courses",
            "BENCH_HEADERS": f"Authorization: Bearer {ctx.bearer}",
        },
    )
    await ctx.wrk(
        "warm-up client_credentials via gateway",
        s.url(s.ports.gateway),
        "static.lua",
        duration=ctx.plan.warmup_s,
        connections=ctx.plan.connections,
        groups={},
        env={
            "BENCH_METHOD": "POST",
            "BENCH_PATH": "/v1/oauth/token",
            "BENCH_BODY": "grant_type=client_credentials",
            "BENCH_HOST": s.host,
            "BENCH_HEADERS": f"Authorization: {w.basic()}\n"
            "Content-Type: application/x-www-form-urlencoded",
        },
    )


Scenario = Callable[[], Awaitable[list[Row]]]


async def scenarios(
    plan: Plan,
    system: System,
    logs: Path,
    peer: Peer | None,
    peer_thread: threading.Thread | None,
    only: frozenset[str],
) -> tuple[list[Row], dict[str, Any], bool]:
    say("migrating and seeding the bench database")
    await prepare_database(system)
    world: World = await seed(system, plan.users)
    say(f"starting the services on ports {system.ports.gateway}-{system.ports.receiver}")
    await asyncio.to_thread(start_services, system)
    ctx = Context(plan=plan, system=system, world=world, logs=logs, cores=os.cpu_count() or 1)
    async with aiohttp.ClientSession() as http:
        answer = (await user_tokens(system, world, http, 1))[0]
    ctx.bearer = answer["access_token"]
    ctx.claims = claims_of(ctx.bearer)
    say("user token from a real code exchange through the gateway; webhook subscriptions")
    await webhooks.subscriptions(ctx)
    await warm_up(ctx)
    at_ready = memory.snapshot(ctx)
    if peer_thread is not None:
        say("waiting for the node-oidc peer's set-up (npm ci, start, minting its refresh pool)")
        await asyncio.to_thread(peer_thread.join, 600)
        if peer is not None:
            say(
                f"node-oidc peer: {peer.problem}"
                if peer.problem
                else f"node-oidc peer ready ({peer.info})"
            )

    rows: list[Row] = []
    ok = True
    steps: dict[str, tuple[str, str, Scenario]] = {
        "validation": ("token validation", "≤ 1.5× floor", lambda: validation.run(ctx)),
        "gateway": ("gateway", "≥ 0.80× bare proxy, p99 +≤ 1 ms", lambda: gateway.run(ctx)),
        "tokens": (
            "token endpoint / client credentials",
            "≥ 1,000/s, ≥ 2,000/s",
            lambda: tokens.run(ctx, peer),
        ),
        "webhooks": ("webhooks", "≥ 2,000/s, p99 ≤ 100 ms at 500/s", lambda: webhooks.run(ctx)),
        "revocation": ("revocation", "0, always", lambda: revocation.run(ctx)),
        "memory": ("memory", "≤ 150 MB each, no growth", lambda: memory.run(ctx, at_ready)),
    }
    for key, (name, goal, step) in steps.items():
        if only and key not in only:
            continue
        began = time.monotonic()
        try:
            rows += await step()
        except (Exception, BenchError) as exc:
            ok = False
            say(f"{name} FAILED: {exc}")
            traceback.print_exc(file=sys.stderr)
            rows.append(failed_row(name, goal, str(exc).splitlines()[0][:160]))
        ctx.details.setdefault("seconds", {})[name] = round(time.monotonic() - began, 1)
        # Where each process's peak (VmHWM) was reached, phase by phase.
        ctx.details.setdefault("memory_after_phase", {})[name] = memory.snapshot(ctx)
    return rows, ctx.details, ok


def _short(commit: str) -> str:
    sha, _, dirty = commit.partition("-")
    return sha[:12] + (f" ({dirty}: uncommitted changes)" if dirty else "")


def _prune(folder: Path, keep: int) -> None:
    """Keep the logs of the last `keep` runs."""
    runs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _lock() -> IO[str]:
    """One bench at a time on a machine: a second would share ports and the database."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    handle = (RESULTS / ".bench.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise BenchError(f"another bench run is in progress ({holder}); wait for it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick plan (no peer)")
    parser.add_argument("--no-peer", action="store_true", help="skip the node-oidc peer")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios to run (validation, gateway, tokens, webhooks, "
        "revocation, memory); the results of such a run are not a full table",
    )
    args = parser.parse_args(argv)
    only = frozenset(x.strip() for x in args.only.split(",") if x.strip())
    unknown = only - {"validation", "gateway", "tokens", "webhooks", "revocation", "memory"}
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}")
    plan = QUICK if args.quick else FULL
    started = datetime.now(UTC)
    began = time.monotonic()
    run_id = f"{started.strftime('%H%M%S')}{secrets.token_hex(2)}"
    logs = RESULTS / "logs" / run_id
    logs.mkdir(parents=True, exist_ok=True)
    _prune(RESULTS / "logs", keep=10)
    # SIGTERM stops the run like Ctrl-C: through the finally blocks below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    from libs.common.logging import configure_logging

    configure_logging("warning", service="bench")
    say(
        f"{plan.name} run {run_id} on {os.cpu_count()} cores; logs and raw wrk output in "
        f"{logs.relative_to(Path.cwd()) if logs.is_relative_to(Path.cwd()) else logs}"
    )
    try:
        wrk.ensure_wrk()
        lock = _lock()
    except BenchError as exc:
        say(str(exc))
        return 2

    system: System | None = None
    peer: Peer | None = None
    peer_thread: threading.Thread | None = None
    rows: list[Row] = []
    details: dict[str, Any] = {}
    ok = False
    try:
        system = make_system(run_id, logs)
        if plan.peer and not args.no_peer and (not only or "tokens" in only):
            peer = Peer(system.ports.peer, logs, system.redis_url, system.prefix)
            say("setting up the node-oidc peer in the background")
            peer_thread = threading.Thread(
                target=peer.prepare, args=(plan.peer_refresh_pool, 600), daemon=True
            )
            peer_thread.start()
        import uvloop

        rows, details, ok = uvloop.run(scenarios(plan, system, logs, peer, peer_thread, only))
    except BenchError as exc:
        say(f"stopped: {exc}")
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        say("stopping everything the bench started")
        if peer is not None:
            # Stopping its server first makes a set-up still minting fail fast.
            peer.stop()
            if peer_thread is not None and peer_thread.is_alive():
                peer_thread.join(timeout=30)
            peer.stop()
        if system is not None:
            codes = system.procs.stop_all()
            bad = {k: v for k, v in codes.items() if v not in (0, None, -15)}
            if bad:
                say(f"exit codes: {bad}")
            try:
                asyncio.run(cleanup(system))
            except Exception as exc:
                say(f"cleanup failed: {exc}")
            system.stop_stores()
    lock.close()
    if not rows:
        return 1
    details["plan"] = plan.name
    details["wall_seconds"] = round(time.monotonic() - began, 1)
    if peer is not None:
        details["node_oidc"] = {"problem": peer.problem, **peer.info}
    details["only"] = sorted(only)
    path = report.write(plan.name + ("-only" if only else ""), started, rows, details)
    print()
    print(
        f"Loopwise Connect bench ({plan.name}), {started:%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} cores ({report.machine()['cpu_model']}), commit "
        f"{_short(report.git_commit())}, {details['wall_seconds']:.0f}s"
    )
    print()
    print(report.table(rows))
    print()
    print(
        "cpu = CPU time of the server processes per request (/proc/<pid>/stat); 'with stores'/"
        "'all' adds the bench database's PostgreSQL backends and Redis."
    )
    print(f"results: {path}")
    return 0 if ok else 1

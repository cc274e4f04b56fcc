"""`make faults` / `python -m faults`: start the production topology, put the workload on it,
inject each fault in turn, score it, print the table and write faults/results/latest.json.

Each fault's time is: a steady stretch (BASELINE_S), the fault and the component's return,
then observation until calls have been succeeding for QUIET_S (at least OBSERVE_MIN_S, at most
OBSERVE_MAX_S after the return), then the drain: until every event committed so far has
reached the receiver and every answered call so far has its audit row (at most DRAIN_S), and
a quiet settle before the next fault. What the drain did not see arrive is looked for again
once the whole run is over: the table's losses are what never arrived; `late` in the JSON
counts what arrived only after its fault's drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson

from faults import catalog, ledger, report
from faults.devstack import ROOT, DevStack, free_port
from faults.workload import SUBSCRIBED, Pace, Workload
from faults.world import World, seed
from libs.common.logging import get_logger

log = get_logger(__name__)

BASELINE_S = 2.0
QUIET_S = 3.0
OBSERVE_MIN_S = 4.0
OBSERVE_MAX_S = 20.0
DRAIN_S = 30.0
SETTLE_S = 2.0
RESULTS = ROOT / "faults" / "results"


def say(text: str) -> None:
    sys.stdout.write(f"[faults] {text}\n")
    sys.stdout.flush()


# -- what the stores and the receiver say ----------------------------------------------------


@dataclass
class Books:
    """The suite's reads of the truth: the outbox, the audit trail, the receiver."""

    pool: asyncpg.Pool
    http: aiohttp.ClientSession
    receiver_url: str
    world: World
    attributed: set[str] = field(default_factory=set)

    async def committed(self) -> set[str]:
        """Ids of every event of the subscribed types the school API committed for our school."""
        rows = await self.pool.fetch(
            "SELECT event_id::text AS id FROM school_api.outbox"
            " WHERE school_id = $1 AND type = ANY($2::text[])",
            self.world.school_id,
            list(SUBSCRIBED),
        )
        return {r["id"] for r in rows}

    async def delivered(self) -> dict[str, int]:
        async with self.http.get(f"{self.receiver_url}/ids/faults") as resp:
            counts: dict[str, int] = orjson.loads(await resp.read())
            return counts

    async def stored_audit(self, request_ids: Collection[str]) -> set[str]:
        if not request_ids:
            return set()
        rows = await self.pool.fetch(
            "SELECT detail->>'request_id' AS rid FROM audit_log"
            " WHERE school_id = $1 AND action = 'api.call'"
            " AND detail->>'request_id' = ANY($2::text[])",
            self.world.school_id,
            list(request_ids),
        )
        return {r["rid"] for r in rows}


async def _retrying(what: str, read: Any, deadline: float) -> Any:
    """A read of the books that waits out the stores' own recovery (PostgreSQL restarting)."""
    while True:
        try:
            return await read()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, aiohttp.ClientError) as e:
            if time.monotonic() > deadline:
                raise
            log.info("faults_books_unavailable", books=what, error=type(e).__name__)
            await asyncio.sleep(0.5)


@dataclass
class Drained:
    events: set[str]
    delivered: dict[str, int]
    audit_due: list[str]
    stored: set[str]
    seconds: float


async def drain(books: Books, workload: Workload, window: ledger.Window) -> Drained:
    """Close the window now, and wait until its events are all delivered and its answered calls
    all audited. The workload goes on: calls from now on are the next window's."""
    began = window.end = time.monotonic()
    deadline = began + DRAIN_S
    # The calls still in progress are the window's too (the client's timeout bounds this).
    await workload.settled(window.end)
    calls = workload.calls
    events = await _retrying("outbox", books.committed, deadline + 60) - books.attributed
    books.attributed |= events
    due = ledger.audit_due(ledger.calls_in(window, calls))
    while True:
        delivered = await _retrying("receiver", books.delivered, deadline + 60)
        stored = await _retrying("audit", lambda: books.stored_audit(due), deadline + 60)
        missing = sum(1 for e in events if not delivered.get(e)) + len(set(due) - stored)
        if not missing or time.monotonic() > deadline:
            return Drained(events, delivered, due, stored, time.monotonic() - began)
        await asyncio.sleep(0.5)


async def observe(calls: list[ledger.Call], returned: float) -> None:
    """Until the calls have been succeeding for QUIET_S after the component's return."""
    while True:
        now = time.monotonic()
        since = now - returned
        last_refusal = max((c.ended for c in calls[-2000:] if ledger.refused(c.status)), default=0)
        if since >= OBSERVE_MAX_S or (since >= OBSERVE_MIN_S and now - last_refusal >= QUIET_S):
            return
        await asyncio.sleep(0.25)


# -- the run -----------------------------------------------------------------------------


def _public(env: Mapping[str, str]) -> tuple[str, int]:
    """The public origin's address and port (the load balancer's, or the only gateway's)."""
    template = env.get("PUBLIC_URL_TEMPLATE", "http://{school}.localhost:8080")
    port = urlsplit(template.replace("{school}", "x")).port or 80
    return f"http://127.0.0.1:{port}", port


def _direct_dsn(stack: Any) -> str:
    """The suite reads PostgreSQL directly, not through the pooler it restarts."""
    for name in ("DATABASE_SESSION_URL", "DIRECT_DATABASE_URL"):
        if stack.env.get(name):
            return str(stack.env[name])
    direct = getattr(stack, "direct_database_url", "")
    return str(direct or stack.env["DATABASE_URL"])


def make_stack(kind: str, extra_env: dict[str, str]) -> Any:
    """The production topology on free ports (beside a running `make cluster`, which keeps its
    own), or the make-dev-like stack; `extra_env` goes to every service."""
    data_dir = ROOT / ".data" / "faults"
    if kind == "dev":
        return DevStack(data_dir / "dev", env={**os.environ, **extra_env})
    from services.dev.topology import Topology, TopologyPorts

    # Its cluster.env goes beside its data: .data/faults/cluster.env.
    return Topology(data_dir / "cluster", ports=TopologyPorts.free(), extra_env=extra_env)


@dataclass
class Scored:
    window: ledger.Window
    drained: Drained
    row: ledger.Row


@dataclass
class Suite:
    """A running stack with the workload on it: faults are injected and scored one by one."""

    stack: Any
    workload: Workload
    books: Books
    scored: list[Scored] = field(default_factory=list)
    _start: float = field(default_factory=time.monotonic)

    async def inject(self, fault: catalog.Fault) -> ledger.Row:
        window = ledger.Window(fault.name, self._start)
        note = ""
        say(f"{fault.name}: {fault.what}")
        await asyncio.sleep(BASELINE_S)
        try:
            window.injected, window.returned = await fault.inject(self.stack)
        except Exception as exc:
            log.exception("faults_inject_failed", fault=fault.name)
            note = f"the fault could not be injected: {exc}"
            window.injected = window.returned = time.monotonic()
        say(f"  back after {window.returned - window.injected:.1f}s; observing")
        await observe(self.workload.calls, window.returned)
        drained = await drain(self.books, self.workload, window)
        await asyncio.sleep(SETTLE_S)
        self._start = window.end
        row = self.score(window, drained.events, drained.delivered, drained.stored, note)
        self.scored.append(Scored(window, drained, row))
        say(f"  {report.line(row)}")
        return row

    def score(
        self,
        window: ledger.Window,
        events: Collection[str],
        delivered: Mapping[str, int],
        stored: Collection[str],
        note: str = "",
    ) -> ledger.Row:
        w = self.workload
        return ledger.score(window, w.calls, w.revocations, events, delivered, stored, note)

    async def final_account(self) -> list[ledger.Row]:
        """Stop the workload, and look again, once everything has had time to arrive, for
        what each drain missed."""
        await self.workload.stop()
        books = self.books
        deadline = time.monotonic() + DRAIN_S
        every_due = [rid for s in self.scored for rid in s.drained.audit_due]

        async def audit() -> set[str]:
            return await books.stored_audit(every_due)

        while True:
            delivered = await _retrying("receiver", books.delivered, deadline + 60)
            stored = await _retrying("audit", audit, deadline + 60)
            missing = [
                s
                for s in self.scored
                if any(not delivered.get(e) for e in s.drained.events)
                or set(s.drained.audit_due) - stored
            ]
            if not missing or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        final: list[ledger.Row] = []
        for s in self.scored:
            row = self.score(s.window, s.drained.events, delivered, stored, s.row.note)
            # Missing when its fault's drain ended, arrived before the run's end.
            row.late = {
                "events": s.row.events_lost - row.events_lost,
                "audit": s.row.audit_lost - row.audit_lost,
            }
            final.append(row)
        return final


@contextlib.asynccontextmanager
async def running(stack: Any, pace: Pace) -> AsyncIterator[Suite]:
    """Start the stack, the receiver and the workload; stop them all, whatever happens."""
    from libs.common import db
    from libs.common.config import load_settings

    started = time.monotonic()
    receiver: subprocess.Popen[bytes] | None = None
    workload: Workload | None = None
    try:
        await stack.start()
        say(f"stack ready in {time.monotonic() - started:.1f}s")
        port = free_port()
        receiver = _start_receiver(port)
        receiver_url = f"http://127.0.0.1:{port}"
        settings = load_settings(stack.env)
        public_url, public_port = _public(stack.env)
        # No floor of connections to restore: asyncpg logs each failed try while PostgreSQL is down.
        pool = await db.create_pool(_direct_dsn(stack), min_size=0, max_size=4)
        async with pool, aiohttp.ClientSession() as http:
            await _wait_http(http, f"{receiver_url}/healthz")
            world = await seed(pool, settings, public_url, public_port)
            workload = Workload(world, pool, receiver_url, secrets.token_hex(3), pace)
            await workload.start()
            say(f"workload on {world.host} (school {world.school_id}); warming up")
            await asyncio.sleep(BASELINE_S)
            yield Suite(stack, workload, Books(pool, http, receiver_url, world))
            await workload.stop()
    finally:
        if workload is not None:
            await workload.stop()
        if receiver is not None:
            receiver.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                receiver.wait(timeout=5)
        say("stopping the stack")
        await stack.stop()


async def run(args: argparse.Namespace) -> int:
    # SIGTERM as Ctrl-C: the run is cancelled and stops everything it started.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    faults = [catalog.named(n) for n in args.only] if args.only else list(catalog.FAULTS)
    extra_env = dict(item.split("=", 1) for item in args.env)
    stack = make_stack(args.stack, extra_env)
    started = time.monotonic()
    say(f"starting the {args.stack} stack")
    async with running(stack, Pace()) as suite:
        skipped = {f.name: why for f in faults if (why := f.missing(stack))}
        for fault in faults:
            if fault.name in skipped:
                say(f"{fault.name}: skipped ({skipped[fault.name]})")
            else:
                await suite.inject(fault)
        rows = await suite.final_account()
        if args.hold:
            say(f"holding the stack for {args.hold:.0f}s to look at (.data/faults/cluster.env)")
            await asyncio.sleep(args.hold)
    elapsed = time.monotonic() - started
    say(f"done in {elapsed:.0f}s")
    print(report.table(rows))
    path = report.write(
        rows,
        args.output,
        stack=args.stack,
        elapsed_s=elapsed,
        pace=Pace(),
        skipped=skipped,
        # The workload's own process shares the cores with what it measures.
        harness_cpu_s=time.process_time(),
        service_env=extra_env,
    )
    say(f"written to {path}")
    return 0


def _start_receiver(port: int) -> subprocess.Popen[bytes]:
    """The webhook receiver, a process of its own (bench/receiver.py)."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.receiver", "--port", str(port)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


async def _wait_http(http: aiohttp.ClientSession, url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer")
        await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        choices=[f.name for f in catalog.FAULTS],
        help="run only this fault (repeatable)",
    )
    parser.add_argument(
        "--stack",
        choices=("cluster", "dev"),
        default=os.environ.get("FAULTS_STACK", "cluster"),
        help="the production topology (default) or a make-dev-like stack of one process each",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every service, e.g. GATEWAY_AUDIT_MODE=durable (repeatable)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "latest.json",
        help="where the JSON goes (default faults/results/latest.json)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep the stack this long after the last fault, to look at it",
    )
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    args = parser.parse_args()
    if any("=" not in item for item in args.env):
        parser.error("--env takes KEY=VALUE")
    if args.list:
        for fault in catalog.FAULTS:
            print(f"{fault.name:<18} {fault.what}")
        return
    # The default loop, not uvloop: the topology starts PostgreSQL's helpers as another user
    # (asyncio's `user=`/`group=`), which uvloop's subprocesses do not take.
    try:
        sys.exit(asyncio.run(run(args)))
    except (asyncio.CancelledError, KeyboardInterrupt):
        say("interrupted; everything the run started is stopped")
        sys.exit(130)

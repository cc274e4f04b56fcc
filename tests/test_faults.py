"""The fault suite's ledger on real data: one fault (a gateway SIGKILLed) under the suite's
workload on a make-dev-like stack of real processes (faults/devstack.py) on the test stores,
scored from what PostgreSQL and the webhook receiver hold; then one audit row deleted, one
delivery forgotten and one revoke moved earlier, each of which the ledger must count."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from faults import catalog, ledger
from faults.devstack import DevStack
from faults.run import running
from faults.workload import Pace
from tests.conftest import StoreUrls


async def test_a_killed_gateway_is_scored_from_what_the_stores_hold(
    store_urls: StoreUrls, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": store_urls.server_database_url,
        "REDIS_URL": store_urls.redis_url,
    }
    stack = DevStack(tmp_path, env=env)
    async with running(stack, Pace()) as suite:
        row = await suite.inject(catalog.named("kill-gateway"))
        scored = suite.scored[0]
        pool = suite.books.pool

        # The only gateway was down: calls were refused, in the fault's time and only then.
        assert row.outage_s > 0
        assert row.refused > 0
        assert row.calls > row.refused
        assert row.refused_for_s <= row.outage_s + 5.5  # the workload's client timeout
        assert row.events > 0
        assert row.revocations > 0

        # An audit row gone: the ledger counts it lost, by its request id.
        due = scored.drained.audit_due
        victim = sorted(scored.drained.stored & set(due))[0]
        await pool.execute(
            "DELETE FROM audit_log WHERE action = 'api.call' AND detail->>'request_id' = $1",
            victim,
        )
        stored = await suite.books.stored_audit(due)
        assert victim not in stored
        # A delivery the receiver never had.
        delivered = dict(scored.drained.delivered)
        event = sorted(e for e in scored.drained.events if delivered.get(e))[0]
        del delivered[event]
        again = suite.score(scored.window, scored.drained.events, delivered, stored)
        assert again.audit_lost == row.audit_lost + 1
        assert again.events_lost == row.events_lost + 1
        assert event in again.lost_samples["events"]

        # A revoke that (had it answered earlier) a real 200 of its grant came after.
        calls = suite.workload.calls
        # Only the window's own calls of the revoked grant's kind count (ledger.score).
        counted = [c for c in ledger.calls_in(scored.window, calls) if c.kind == ledger.DOOMED]
        revocation = next(
            r
            for r in suite.workload.revocations
            if scored.window.holds(r.answered)
            and any(c.grant == r.grant and c.status == 200 for c in counted)
        )
        first_ok = min(
            c.started for c in counted if c.grant == revocation.grant and c.status == 200
        )
        earlier = replace(revocation, sent=first_ok - 0.002, answered=first_ok - 0.001)
        others = [r for r in suite.workload.revocations if r is not revocation]
        moved = ledger.score(
            scored.window,
            calls,
            [*others, earlier],
            scored.drained.events,
            scored.drained.delivered,
            scored.drained.stored,
        )
        assert moved.successes_after_revoke > row.successes_after_revoke


def test_recovery_runs_from_the_return_to_the_last_refused_call() -> None:
    window = ledger.Window("f", start=0.0, injected=10.0, returned=12.0, end=30.0)

    def call(started: float, ended: float, status: int) -> ledger.Call:
        return ledger.Call(ledger.API, started, ended, status, f"r{started}")

    during = [call(9.0, 9.1, 200), call(10.2, 10.3, 0), call(11.0, 11.5, 502)]
    after = [call(13.0, 14.5, 503), call(15.0, 15.1, 200)]
    row = ledger.score(window, [*during, *after], [], [], {}, ["r9.0", "r15.0"])
    assert row.refused == 3
    assert row.refused_for_s == 14.5 - 10.2
    assert row.recovery_s == 14.5 - 12.0
    assert row.outage_s == 2.0
    # Refused only while the component was away: recovered at its return.
    only_during = ledger.score(window, during, [], [], {}, ["r9.0"])
    assert only_during.recovery_s == 0.0
    assert only_during.met()
    # Calls of another window are not this one's.
    assert ledger.score(window, [call(31.0, 31.1, 0)], [], [], {}, []).refused == 0

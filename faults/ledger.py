"""What the workload saw, and what each fault cost: the suite's bookkeeping, free of I/O.

The workload records every call it makes (`Call`: what kind, when it started and ended on the
harness's monotonic clock, the status, its request id) and every revocation (`Revocation`:
the grant and when the revoke answered). A fault owns the window of time from the end of the
previous one to the end of its own drain (`Window`), so every call belongs to exactly one
fault. `score` turns a window, the calls in it, and what the stores and the receiver say
afterwards into one row of the table:

- refused: calls with no answer (status 0: refused connection, reset, timeout) or a 5xx, of
  every kind; `refused_for_s` from the first such call's start to the last one's end;
- recovery_s: from the component's return to the end of the last refused call (0 when
  nothing was refused after it came back): after that, every call succeeded;
- events_lost: events the school API committed in the window (its outbox) that never reached
  the receiver; `duplicates`: deliveries beyond the first of those events;
- audit_lost: calls the gateway answered with a record due (its upstream's answer, a 403 or
  a 429: `AUDITED`) whose request id has no `audit_log` row;
- stalled: calls answered, but after more than STALL_S (held by a frozen process);
- successes_after_revoke: calls with a revoked grant's token that started after the revoke
  answered and got a 2xx.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# What the goals allow (issue 15 section 4).
RECOVERY_GOAL_S = 10.0
# An answer slower than this is a stall (a frozen process holding the call), not a refusal.
STALL_S = 1.0
# Lost records and events named in a row, for whoever looks for the loss path.
SAMPLES = 5

# Kinds of call. Every one goes through the public origin (the load balancer).
API = "api"  # GET of a protected route with one of the steady tokens
WRITE = "write"  # a school API write, which commits an event
REFRESH = "refresh"  # a refresh_token grant
EXCHANGE = "exchange"  # an authorization code exchange (a new grant for a revocation)
REVOKE = "revoke"  # RFC 7009 revoke of that grant
DOOMED = "doomed"  # a call with the token of a grant about to be (or already) revoked
PROTECTED = frozenset({API, WRITE, DOOMED})


def refused(status: int) -> bool:
    """No answer at all, or a server error: the call was refused for the fault."""
    return status == 0 or status >= 500


def audited(status: int) -> bool:
    """Whether the gateway owes this answer an audit record. It records every call it let
    through to the upstream (whatever the upstream answered) and its own 403 and 429; its 401
    (bad or revoked token) and 503 (revocation check or audit trail unavailable) have none.
    A 5xx could be the upstream's or the gateway's own, so only 2xx, 3xx, 403, 404 and 429
    are held to it: what an upstream answered or the gateway refused with a record."""
    return 200 <= status < 400 or status in (403, 404, 429)


@dataclass(slots=True)
class Call:
    kind: str
    started: float
    ended: float
    status: int
    request_id: str | None = None
    grant: str | None = None


@dataclass(frozen=True, slots=True)
class Revocation:
    grant: str
    sent: float  # the first try of the revoke (a refused try may have revoked all the same)
    answered: float


@dataclass(slots=True)
class Window:
    """One fault's time: `start` (the previous window's end), `injected`, `returned` (the
    component is back: restarted and ready, resumed, failed over, reloaded), `end` (its drain
    began: calls from then on belong to the next window)."""

    fault: str
    start: float
    injected: float = 0.0
    returned: float = 0.0
    end: float = 0.0

    def holds(self, moment: float) -> bool:
        return self.start <= moment < self.end


@dataclass
class Row:
    fault: str
    refused: int
    recovery_s: float
    events_lost: int
    audit_lost: int
    successes_after_revoke: int
    refused_for_s: float
    duplicates: int
    calls: int
    events: int
    revocations: int
    outage_s: float
    stalled: int = 0
    refused_by_kind: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    late: dict[str, int] = field(default_factory=dict)
    # A few of the lost: audit records as "kind status request-id", events by id.
    lost_samples: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""

    def goals(self) -> dict[str, bool]:
        return {
            "events_lost": self.events_lost == 0,
            "audit_lost": self.audit_lost == 0,
            "successes_after_revoke": self.successes_after_revoke == 0,
            "recovery": self.recovery_s <= RECOVERY_GOAL_S,
        }

    def met(self) -> bool:
        return all(self.goals().values())

    def as_json(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "refused": self.refused,
            "recovery_s": round(self.recovery_s, 2),
            "events_lost": self.events_lost,
            "audit_lost": self.audit_lost,
            "successes_after_revoke": self.successes_after_revoke,
            "refused_for_s": round(self.refused_for_s, 2),
            "duplicates": self.duplicates,
            "calls": self.calls,
            "events": self.events,
            "revocations": self.revocations,
            "outage_s": round(self.outage_s, 2),
            "stalled": self.stalled,
            "refused_by_kind": self.refused_by_kind,
            "unexpected": self.unexpected,
            "late": self.late,
            "lost_samples": self.lost_samples,
            "goals": self.goals(),
            "met": self.met(),
            "note": self.note,
        }


def expected_status(call: Call, revocation: Revocation | None) -> bool:
    """Whether a call that was answered got what a healthy system answers: 2xx, except for a
    doomed grant's call started after its revoke answered (401), and a doomed call racing the
    revoke (either)."""
    if call.kind == DOOMED and revocation is not None and call.ended >= revocation.sent:
        if call.started > revocation.answered:
            return call.status == 401
        return call.status == 401 or 200 <= call.status < 300
    return 200 <= call.status < 300


def _described(call: Call, window: Window) -> str:
    return (
        f"{call.kind} {call.status} {call.request_id or ''} sent "
        f"{call.started - window.injected:+.2f}s from the fault, answered in "
        f"{call.ended - call.started:.2f}s"
    )


def calls_in(window: Window, calls: Iterable[Call]) -> list[Call]:
    return [c for c in calls if window.holds(c.started)]


def audit_due(calls: Iterable[Call]) -> list[str]:
    """Request ids of the calls whose audit record must exist."""
    return [
        c.request_id
        for c in calls
        if c.kind in PROTECTED and c.request_id is not None and audited(c.status)
    ]


def score(
    window: Window,
    calls: Iterable[Call],
    revocations: Iterable[Revocation],
    committed: Collection[str],
    delivered: Mapping[str, int],
    stored_audit: Collection[str],
    note: str = "",
) -> Row:
    """The row of one fault. `calls` may hold every call of the run: those that started in the
    window are its own. `committed`: the event ids the school API committed in the window;
    `delivered`: deliveries per event id at the receiver; `stored_audit`: request ids that
    have their `audit_log` row."""
    mine = calls_in(window, calls)
    revocations = list(revocations)
    by_grant = {r.grant: r for r in revocations}
    revoked_at = {r.grant: r.answered for r in revocations}
    failures = [c for c in mine if refused(c.status)]
    by_kind = Counter(c.kind for c in failures)
    odd = [
        c
        for c in mine
        if not refused(c.status) and not expected_status(c, by_grant.get(c.grant or ""))
    ]
    unexpected = Counter(f"{c.kind}:{c.status}" for c in odd)
    late = [
        c
        for c in mine
        if c.kind == DOOMED
        and c.grant in revoked_at
        and c.started > revoked_at[c.grant]
        and 200 <= c.status < 300
    ]
    stored = set(stored_audit)
    due = set(audit_due(mine)) - stored
    unaudited = [_described(c, window) for c in mine if c.request_id in due]
    audit_lost = len(unaudited)
    undelivered = sorted(event for event in committed if delivered.get(event, 0) == 0)
    events_lost = len(undelivered)
    duplicates = sum(max(0, delivered.get(event, 0) - 1) for event in committed)
    if failures:
        first = min(c.started for c in failures)
        last = max(c.ended for c in failures)
        refused_for = last - first
        recovery = max(0.0, last - window.returned)
    else:
        refused_for = recovery = 0.0
    return Row(
        fault=window.fault,
        refused=len(failures),
        recovery_s=recovery,
        events_lost=events_lost,
        audit_lost=audit_lost,
        successes_after_revoke=len(late),
        refused_for_s=refused_for,
        duplicates=duplicates,
        calls=len(mine),
        events=len(committed),
        revocations=sum(1 for r in revocations if window.holds(r.answered)),
        outage_s=max(0.0, window.returned - window.injected),
        stalled=sum(1 for c in mine if not refused(c.status) and c.ended - c.started > STALL_S),
        refused_by_kind=dict(sorted(by_kind.items())),
        unexpected=dict(sorted(unexpected.items())),
        lost_samples={
            k: v[:SAMPLES]
            for k, v in (
                ("audit", unaudited),
                ("events", undelivered),
                ("unexpected", [_described(c, window) for c in odd]),
            )
            if v
        },
        note=note,
    )

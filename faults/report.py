"""The table and faults/results/latest.json (contract section 13: `{"rows": [{"fault",
"refused", "recovery_s", "events_lost", "audit_lost", "successes_after_revoke"}, ...]}`, with
more fields beside them)."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from faults.ledger import RECOVERY_GOAL_S, Row
from faults.workload import Pace

COLUMNS = (
    ("fault", 18),
    ("refused", 8),
    ("for s", 6),
    ("recover s", 9),
    ("events lost", 11),
    ("dups", 5),
    ("audit lost", 10),
    ("ok after revoke", 15),
    ("goals", 22),
)


def _flags(row: Row) -> str:
    if row.note and not row.calls:
        return "not run"
    failed = [name for name, ok in row.goals().items() if not ok]
    return "met" if not failed else "NOT MET: " + ",".join(failed)


def line(row: Row) -> str:
    text = (
        f"refused {row.refused} over {row.refused_for_s:.1f}s, {row.stalled} stalled, recovered "
        f"{row.recovery_s:.1f}s after the return (outage {row.outage_s:.1f}s), events lost "
        f"{row.events_lost}/{row.events} (dups {row.duplicates}), audit lost {row.audit_lost}, "
        f"successes after revoke {row.successes_after_revoke}/{row.revocations} revokes: "
        f"{_flags(row)}"
    )
    if row.unexpected:
        text += f"; unexpected {row.unexpected}"
    if row.note:
        text += f" ({row.note})"
    return text


def table(rows: list[Row]) -> str:
    head = " ".join(f"{name:<{width}}" for name, width in COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        values = (
            row.fault,
            row.refused,
            f"{row.refused_for_s:.1f}",
            f"{row.recovery_s:.1f}",
            f"{row.events_lost}/{row.events}",
            row.duplicates,
            row.audit_lost,
            row.successes_after_revoke,
            _flags(row),
        )
        lines.append(" ".join(f"{v!s:<{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True)))
    lines.append(
        f"goals: events lost 0, audit records lost 0, successes after revoke 0, recovery "
        f"within {RECOVERY_GOAL_S:.0f} s of the component's return"
    )
    for row in rows:
        extra = {
            k: v for k, v in (("unexpected", row.unexpected), ("late", row.late)) if any(v.values())
        }
        if extra or row.note:
            lines.append(f"  {row.fault}: {extra or ''} {row.note}".rstrip())
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(
    rows: list[Row],
    path: Path,
    *,
    stack: str,
    elapsed_s: float,
    pace: Pace,
    skipped: dict[str, str] | None = None,
    harness_cpu_s: float = 0.0,
    service_env: dict[str, str] | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "rows": [row.as_json() for row in rows],
        "skipped": skipped or {},
        "all_goals_met": all(row.met() for row in rows),
        "stack": stack,
        "service_env": service_env or {},
        "elapsed_s": round(elapsed_s, 1),
        "harness_cpu_s": round(harness_cpu_s, 1),
        "workload": dataclasses.asdict(pace),
        "commit": _commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
    }
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    return path

"""The summary table (one row per scenario: ours, the baseline from the same run, the ratio,
the goal) and bench/results/latest.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.world import ROOT

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    scenario: str
    ours: str
    baseline: str
    ratio: str
    goal: str
    verdict: str  # met | NOT MET | info | failed
    data: dict[str, Any] = field(default_factory=dict)


def ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}×" if base else "—"


def failed_row(scenario: str, goal: str, error: str) -> Row:
    return Row(scenario, f"failed: {error}", "—", "—", goal, "failed", {"error": error})


def table(rows: list[Row]) -> str:
    headers = ("scenario", "ours", "baseline (same run)", "ratio", "goal", "verdict")
    cells = [(r.scenario, r.ours, r.baseline, r.ratio, r.goal, r.verdict) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def fmt(values: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    lines = [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(c) for c in cells]
    return "\n".join(lines)


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, timeout=10, check=True
        )
        commit = done.stdout.decode().strip()
        # Dirty when what is measured differs from the commit (not the bench's own files).
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "libs",
                "services",
                "deploy",
                "pyproject.toml",
                "requirements.lock",
            ],
            cwd=ROOT,
            capture_output=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def write(plan: str, started: datetime, rows: list[Row], details: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {
        "plan": plan,
        "date": started.astimezone(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "machine": machine(),
        "rows": [asdict(r) for r in rows],
        "details": details,
    }
    text = json.dumps(document, indent=2, default=str)
    # A partial run (--only) does not replace the latest full table.
    latest = RESULTS / ("latest.json" if not plan.endswith("-only") else "latest-partial.json")
    latest.write_text(text + "\n")
    stamp = started.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"{plan}-{stamp}.json").write_text(text + "\n")
    return latest

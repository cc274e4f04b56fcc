"""A measured wrk run: the load, the CPU each process spent on it, and the rest of the machine.

CPU time per request (from /proc/<pid>/stat of the server processes, the PostgreSQL backends of
the bench database and the Redis server) is printed beside every rate: this machine is shared,
and CPU per request moves far less than requests per second when something else runs.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import wrk
from bench.plan import Plan
from bench.procs import CpuMeter, CpuUse, machine_busy_seconds
from bench.world import System, World, pg_backend_pids

# A run during which the rest of the machine used more than this share of one core is
# marked noisy.
NOISY_SHARE = 0.25


@dataclass
class Measured:
    label: str
    result: wrk.WrkResult
    cpu: CpuUse

    def cpu_ms_per_req(self, *labels: str) -> float:
        n = self.result.requests
        return self.cpu.total(*labels) * 1000 / n if n else 0.0

    @property
    def other_share(self) -> float:
        return self.cpu.other_share(self.result.wrk_cpu_s)

    @property
    def noisy(self) -> bool:
        return self.other_share > NOISY_SHARE

    def as_dict(self) -> dict[str, Any]:
        per_req = {
            label: round(seconds * 1000 / self.result.requests, 4) if self.result.requests else 0
            for label, seconds in self.cpu.seconds.items()
        }
        return {
            "label": self.label,
            **self.result.as_dict(),
            "cpu_seconds": {k: round(v, 3) for k, v in self.cpu.seconds.items()},
            "cpu_ms_per_request": per_req,
            "other_cpu_share": round(self.other_share, 3),
            "noisy": self.noisy,
        }

    def line(self, *front: str) -> str:
        r = self.result
        parts = [
            f"{self.label:<34} {r.rps:9.1f} req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms",
            f"cpu {self.cpu_ms_per_req(*front):.3f} ms/req" if front else "",
            f"(all {self.cpu_ms_per_req(*self.cpu.seconds):.3f})",
            f"err {r.errors}" if r.errors else "",
            f"other {self.other_share:.0%}",
        ]
        if r.exhausted:
            parts.append(f"pool used up after {r.window_s:.1f}s")
        if self.noisy:
            parts.append("NOISY")
        return "  ".join(p for p in parts if p)


@dataclass
class Context:
    """Everything a scenario needs."""

    plan: Plan
    system: System
    world: World
    logs: Path
    cores: int
    bearer: str = ""
    claims: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def say(self, text: str) -> None:
        print(f"[bench] {text}", flush=True)

    async def wait_quiet(self, max_wait: float) -> None:
        """Wait (bounded) until the machine's other work has settled."""
        deadline = time.monotonic() + max_wait
        waited = False
        while time.monotonic() < deadline:
            before = machine_busy_seconds()
            await asyncio.sleep(0.5)
            busy = (machine_busy_seconds() - before) / 0.5
            if busy < 0.3:
                return
            if not waited:
                self.say(f"machine {busy:.0%} busy (of one core); waiting up to {max_wait:.0f}s")
                waited = True

    async def wrk(
        self,
        label: str,
        url: str,
        script: str,
        *,
        duration: float,
        connections: int,
        groups: Mapping[str, Sequence[int]],
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        quiet_wait: float = 0.0,
        timeout_s: float = 5.0,
    ) -> Measured:
        if quiet_wait > 0:
            await self.wait_quiet(quiet_wait)
        profiler = self._profile(label, groups, duration)
        meter = CpuMeter()
        backends = await pg_backend_pids(self.system.database_url)
        meter.begin({**groups, "postgres": backends, "redis": self.system.redis_pids()})
        result = await asyncio.to_thread(
            wrk.run,
            url,
            script,
            duration=duration,
            connections=connections,
            args=args,
            env=env,
            timeout_s=timeout_s,
            log=self.logs / "wrk.log",
        )
        after = await pg_backend_pids(self.system.database_url)
        cpu = meter.end({"postgres": after})
        if profiler is not None:
            await asyncio.to_thread(profiler.wait, duration + 30)
        return Measured(label, result, cpu)

    def _profile(
        self, label: str, groups: Mapping[str, Sequence[int]], duration: float
    ) -> subprocess.Popen[bytes] | None:
        """With BENCH_PROFILE=1, py-spy samples the run's first server process (a Python one)
        into logs/profile-<label>.txt (collapsed stacks; `python -m bench.stacks FILE` sums
        them). Off by default: the sampler takes CPU from the machine under test."""
        if not os.environ.get("BENCH_PROFILE") or label.startswith("warm-up"):
            return None
        pids = next(iter(groups.values()), [])
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not pids or not Path(spy).exists():
            return None
        try:
            comm = Path(f"/proc/{pids[0]}/comm").read_text().strip()
        except OSError:
            return None
        if not comm.startswith("python"):
            return None
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")
        return subprocess.Popen(
            [spy, "record", "--pid", str(pids[0]), "--duration", str(max(1, round(duration))),
             "--rate", "200", "--nonblocking", "--format", "raw",
             "--output", str(self.logs / f"profile-{name}.txt")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

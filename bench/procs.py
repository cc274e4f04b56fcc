"""Processes the harness starts, and what /proc says about them: CPU time and memory.

Every process is started in a session of its own (a Ctrl-C in the terminal reaches the
harness, which stops them in order) and stopped by its own pid: SIGTERM, then SIGKILL after a
bounded wait. Nothing here ever signals a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The bench cannot go on; printed without a traceback."""


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), 0.0 when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass(frozen=True, slots=True)
class Memory:
    rss_mb: float
    hwm_mb: float


def memory(pid: int) -> Memory | None:
    """VmRSS and VmHWM (peak RSS since start) of a live process, in MB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    if "VmRSS" not in values:
        return None
    return Memory(values["VmRSS"], values.get("VmHWM", values["VmRSS"]))


def pids_named(names: Iterable[str]) -> list[int]:
    """Processes whose comm is one of `names` (read-only lookup, e.g. the Redis server)."""
    wanted = set(names)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in wanted:
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class Proc:
    """One process the harness started."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log: Path
    port: int | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.port is not None and not port_free(self.port):
            raise BenchError(
                f"port {self.port} (for {self.name}) is taken; stop what holds it or set "
                "BENCH_PORT_BASE to another range"
            )
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                list(self.argv),
                env=dict(self.env),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http(self, path: str, timeout: float, host: str | None = None) -> None:
        """Until GET http://127.0.0.1:port/path answers 200, or raise with the log's tail."""
        assert self.port is not None
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{path}"
        while True:
            if not self.alive():
                raise BenchError(f"{self.name} exited during start:\n{self.tail()}")
            request = urllib.request.Request(url, headers={"Host": host} if host else {})
            try:
                with urllib.request.urlopen(request, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait (services finish in-flight work), SIGKILL if it will not go."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(timeout=5)
        return self.popen.returncode


class Procs:
    """The harness's processes, stopped in reverse order of start."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    def start(self, proc: Proc) -> Proc:
        proc.start()
        self.started.append(proc)
        return proc

    def by_name(self, name: str) -> Proc:
        for proc in self.started:
            if proc.name == name:
                return proc
        raise KeyError(name)

    def stop_all(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        # SIGTERM to all at once, so their graceful shutdowns overlap, then wait for each.
        for proc in reversed(self.started):
            if proc.alive():
                assert proc.popen is not None
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        for proc in reversed(self.started):
            codes[proc.name] = proc.stop()
        self.started.clear()
        return codes


@dataclass
class CpuSnapshot:
    at: float
    machine: float
    per_pid: dict[int, float]


class CpuMeter:
    """CPU seconds spent by named groups of processes between two snapshots.

    `groups` maps a label to pids; `dynamic` labels are re-listed at each snapshot (the
    PostgreSQL backends of the bench database come and go with the pools).
    """

    def __init__(self) -> None:
        self._start: CpuSnapshot | None = None
        self._groups: dict[str, list[int]] = {}

    @staticmethod
    def snapshot(pids: Iterable[int]) -> CpuSnapshot:
        return CpuSnapshot(
            time.monotonic(), machine_busy_seconds(), {p: cpu_seconds(p) for p in set(pids)}
        )

    def begin(self, groups: Mapping[str, Sequence[int]]) -> None:
        self._groups = {k: list(v) for k, v in groups.items()}
        self._start = self.snapshot(p for pids in self._groups.values() for p in pids)

    def end(self, late_groups: Mapping[str, Sequence[int]] | None = None) -> CpuUse:
        assert self._start is not None
        groups = {k: list(v) for k, v in self._groups.items()}
        for label, pids in (late_groups or {}).items():
            groups[label] = sorted(set(groups.get(label, [])) | set(pids))
        end = self.snapshot(p for pids in groups.values() for p in pids)
        wall = end.at - self._start.at
        per_group: dict[str, float] = {}
        for label, pids in groups.items():
            per_group[label] = sum(
                max(0.0, end.per_pid.get(p, 0.0) - self._start.per_pid.get(p, 0.0)) for p in pids
            )
        return CpuUse(wall, end.machine - self._start.machine, per_group)


@dataclass(frozen=True, slots=True)
class CpuUse:
    wall_s: float
    machine_busy_s: float
    seconds: dict[str, float]

    def total(self, *labels: str) -> float:
        return sum(self.seconds.get(label, 0.0) for label in labels)

    def other_share(self, extra_known: float = 0.0) -> float:
        """Share of one core's time used by processes not ours during the window."""
        if self.wall_s <= 0:
            return 0.0
        ours = sum(self.seconds.values()) + extra_known
        return max(0.0, self.machine_busy_s - ours) / self.wall_s

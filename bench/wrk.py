"""The load generator: Debian's `wrk`, in its own process, with the Lua scripts of bench/lua.

Every run is bounded: `-d` seconds, a subprocess timeout a little longer, and pool scripts stop
(never replay) when their pool runs out. The scripts print one `RESULT key=value ...` line;
`window_s` is the time the load really ran (shorter than `-d` when a pool ran out, measured in
Lua with clock_gettime through LuaJIT's FFI), and the rate is requests over that window.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import BenchError

LUA_DIR = Path(__file__).resolve().parent / "lua"


def ensure_wrk() -> str:
    """The wrk binary; installed from Debian when missing and we are root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            "wrk is not installed. Install it with `sudo apt-get install -y wrk` "
            "(Debian/Ubuntu) and run the bench again."
        )
    sys.stderr.write("[bench] wrk is missing: installing it from Debian (apt-get install wrk)\n")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "wrk"]
    done = subprocess.run(install, env=env, capture_output=True, timeout=300, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(install, env=env, capture_output=True, timeout=300, check=False)
    found = shutil.which("wrk")
    if done.returncode != 0 or not found:
        raise BenchError(
            "could not install wrk with apt-get "
            f"({done.stderr.decode(errors='replace')[-300:]}); install it and run again"
        )
    return found


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    window_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non2xx: int
    socket_errors: int
    exhausted: bool
    captured: int
    wrk_cpu_s: float
    connections: int

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse(line: str) -> dict[str, str]:
    out = {}
    for item in line.split()[1:]:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def run(
    url: str,
    script: str,
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
    log: Path | None = None,
) -> WrkResult:
    """One wrk run; raises BenchError when wrk fails or prints no RESULT line."""
    binary = ensure_wrk()
    seconds = max(1, round(duration))
    argv = [
        binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
        "-s",
        str(LUA_DIR / script),
        url,
    ]
    if args:
        argv += ["--", *args]
    cpu_before = _children_cpu()
    proc = subprocess.Popen(
        argv,
        cwd=LUA_DIR,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"wrk did not stop within {seconds + 30}s ({script})") from None
    # wrk's own CPU time (a reaped child's, from getrusage through os.times).
    usage = max(0.0, _children_cpu() - cpu_before)
    text = out.decode(errors="replace")
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(argv)}\n{text}\n")
    result_line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or result_line is None:
        raise BenchError(f"wrk failed (exit {proc.returncode}) running {script}:\n{text[-1500:]}")
    r = _parse(result_line)
    requests = int(r["requests"])
    window = float(r["window_s"]) or float(r["duration_s"])
    return WrkResult(
        requests=requests,
        duration_s=float(r["duration_s"]),
        window_s=window,
        rps=requests / window if window > 0 else 0.0,
        p50_ms=float(r["p50_ms"]),
        p90_ms=float(r["p90_ms"]),
        p99_ms=float(r["p99_ms"]),
        max_ms=float(r["max_ms"]),
        non2xx=int(r["non2xx"]),
        socket_errors=sum(int(r[k]) for k in ("connect_err", "read_err", "write_err", "timeouts")),
        exhausted=r.get("exhausted", "0") != "0",
        captured=int(r.get("captured", "0")),
        wrk_cpu_s=usage,
        connections=connections,
    )


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system

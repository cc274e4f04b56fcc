"""The embedded Valkey (a Redis) `make dev` starts when no Redis answers: no persistence."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from services.dev.probes import HOST, logger, redis_usable, tail, tcp_answers

_VALKEY_START_TIMEOUT = 15.0
_VALKEY_STOP_TIMEOUT = 5.0


def start_valkey(pkg: Path, data_dir: Path, port: int) -> Callable[[], None]:
    """Start valkey-server on `port`, working in `data_dir`; return its stop()."""
    binary = pkg / "bin" / "valkey-server"
    workdir = data_dir / "valkey"
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / "valkey.log"
    logger().info("localstores.valkey_starting", port=port)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [
                str(binary),
                "--bind",
                HOST,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal must not take Redis away while the
            # services are still draining; stop() ends it afterwards.
            start_new_session=True,
        )

    def stop() -> None:
        if proc.poll() is not None:
            return
        logger().info("localstores.valkey_stopping", port=port, pid=proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_VALKEY_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=_VALKEY_STOP_TIMEOUT)

    deadline = time.monotonic() + _VALKEY_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"valkey-server exited with {proc.returncode} before answering on "
                f"{HOST}:{port}; last lines of {log_file}:\n{tail(log_file)}"
            )
        if tcp_answers(port) and redis_usable(port) is None:
            break
        if time.monotonic() >= deadline:
            stop()
            raise RuntimeError(
                f"valkey-server did not answer PING on {HOST}:{port} within "
                f"{_VALKEY_START_TIMEOUT:.0f}s; last lines of {log_file}:\n{tail(log_file)}"
            )
        time.sleep(0.02)
    logger().info("localstores.valkey_started", port=port, pid=proc.pid)
    return stop

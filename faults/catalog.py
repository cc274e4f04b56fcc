"""The faults, one at a time: each injects itself into the running stack and answers when it
was injected and when the component came back (the moment recovery is measured from).

The stack is `services/dev/topology.py`'s `Topology` (or `faults.devstack.DevStack`, which has
the same control surface for the service processes only); a fault whose component the stack
does not have is skipped, with the reason in its row.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from libs.common.logging import get_logger

log = get_logger(__name__)

KINDS = ("gateway", "identity", "webhooks", "school_api")
Inject = Callable[[Any], Awaitable[tuple[float, float]]]


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    what: str
    # The stack's part it acts on (None: a service process) and, for the Redis faults, a
    # method that part must have (a Redis Cluster handle, not a single server).
    needs: str | None
    inject: Inject
    needs_method: str | None = None

    def missing(self, stack: Any) -> str | None:
        """Why the stack cannot take this fault, or None."""
        if self.needs is None:
            return None
        part = getattr(stack, self.needs, None)
        if part is None:
            return f"the stack has no {self.needs}"
        if self.needs_method is not None and not hasattr(part, self.needs_method):
            return f"the stack's {self.needs} is not a cluster"
        return None


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f}s")
        await asyncio.sleep(0.05)


def _first(stack: Any, kind: str) -> Any:
    for proc in stack.services.values():
        if proc.kind == kind:
            return proc
    raise RuntimeError(f"the stack runs no {kind} process")


def _sigkill(kind: str) -> Inject:
    async def inject(stack: Any) -> tuple[float, float]:
        proc = _first(stack, kind)
        old = proc.pid
        injected = time.monotonic()
        proc.kill(signal.SIGKILL)
        # Back = its supervisor started a new process and that one is ready.
        await _until(lambda: _pid(proc) not in (None, old), 30, f"{proc.name} restarted")
        await proc.wait_ready()
        return injected, time.monotonic()

    return inject


def _pid(proc: Any) -> int | None:
    try:
        pid = proc.pid
    except (AssertionError, AttributeError, RuntimeError):
        return None
    return pid if isinstance(pid, int) else None


def revocation_lease(stack: Any) -> float:
    return float(stack.env.get("GATEWAY_REVOCATION_LEASE", "2.0") or 0.0)


async def _sigstop_gateway(stack: Any) -> tuple[float, float]:
    """Frozen longer than its revocation lease: the other gateways must not wait for it to
    hear of revocations, and on SIGCONT it must not answer from what it knew before."""
    proc = _first(stack, "gateway")
    held = max(2.0 * revocation_lease(stack), 2.0) + 1.0
    injected = time.monotonic()
    proc.kill(signal.SIGSTOP)
    try:
        await asyncio.sleep(held)
    finally:
        proc.kill(signal.SIGCONT)
    return injected, time.monotonic()


# The Redis Cluster handle (services/dev/redis_cluster.py's RedisCluster) is synchronous: its
# calls run in a thread, so the workload goes on meanwhile.


async def _redis_primary(stack: Any) -> tuple[float, float]:
    """A primary SIGKILLed; its replica takes over. Back = every slot served again (the
    replica promoted). The killed node is then started again, empty, and rejoins as a
    replica, so the next fault meets the whole cluster; that is not counted as outage."""
    cluster = stack.redis
    primary = (await asyncio.to_thread(cluster.primaries))[0]
    injected = time.monotonic()
    await asyncio.to_thread(cluster.kill_node, primary)
    await asyncio.to_thread(cluster.wait_ok)
    returned = time.monotonic()
    await asyncio.to_thread(cluster.start_node, primary, empty=True)
    await asyncio.to_thread(cluster.wait_ok)
    return injected, returned


async def _redis_empty(stack: Any) -> tuple[float, float]:
    """Every node stopped and started again with no data (no persistence, as configured):
    the same cluster, slots and nodes, and nothing in it. Back = `cluster_state:ok`."""
    cluster = stack.redis

    def restart_empty() -> None:
        for port in cluster.ports:
            cluster.stop_node(port)
        for port in cluster.ports:
            cluster.start_node(port, empty=True)
        cluster.wait_ok()

    injected = time.monotonic()
    await asyncio.to_thread(restart_empty)
    return injected, time.monotonic()


def _restart(attribute: str) -> Inject:
    async def inject(stack: Any) -> tuple[float, float]:
        injected = time.monotonic()
        await getattr(stack, attribute).restart()
        return injected, time.monotonic()

    return inject


async def _nginx_reload(stack: Any) -> tuple[float, float]:
    injected = time.monotonic()
    await stack.nginx.reload()
    return injected, time.monotonic()


async def _nothing(_stack: Any) -> tuple[float, float]:
    now = time.monotonic()
    return now, now


FAULTS: tuple[Fault, ...] = (
    Fault("none", "no fault: the workload alone, the control row", None, _nothing),
    *(
        Fault(f"kill-{kind}", f"SIGKILL of one {kind} process", None, _sigkill(kind))
        for kind in KINDS
    ),
    Fault(
        "stop-gateway",
        "SIGSTOP of one gateway for longer than the revocation lease, then SIGCONT",
        None,
        _sigstop_gateway,
    ),
    Fault(
        "redis-primary",
        "SIGKILL of a Redis primary; its replica takes over",
        "redis",
        _redis_primary,
        "primaries",
    ),
    Fault("postgres-restart", "PostgreSQL restart", "postgres", _restart("postgres")),
    Fault("pgbouncer-restart", "PgBouncer restart", "pgbouncer", _restart("pgbouncer")),
    Fault("nginx-reload", "nginx reload", "nginx", _nginx_reload),
    # Last: what it breaks for good (a consumer that never reads again) would otherwise be
    # charged to every fault after it.
    Fault("redis-empty", "Redis Cluster restarted empty", "redis", _redis_empty, "primaries"),
)


def named(name: str) -> Fault:
    for fault in FAULTS:
        if fault.name == name:
            return fault
    raise KeyError(name)

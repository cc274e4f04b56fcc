"""A real Redis Cluster on loopback: N primaries with one replica each, from Debian's redis-server.

Used by `make cluster` (the production topology on one machine), the fault suite and
tests/test_redis_cluster.py. Each node runs in its own directory under ``data_dir`` with its own
``nodes.conf`` and log, without persistence by default (``appendonly no``, ``save ""``) and with
``maxmemory-policy noeviction``, so a node restarted is empty unless the caller took a snapshot
first (:meth:`RedisCluster.snapshot`), which is how "restart from an old snapshot" is played.
``cluster-node-timeout`` is short (2 s by default) so a replica takes over a dead primary within
a few seconds.

:func:`start_redis_cluster` starts the nodes, creates the cluster with ``redis-cli --cluster
create --cluster-replicas 1`` and waits until every node says ``cluster_state:ok`` and knows every
other one. The handle it returns stops, kills and restarts single nodes, waits for the cluster to
heal, and stops everything; its :attr:`~RedisCluster.url` is the ``redis+cluster://`` URL that
libs/common's client factory reads (every node as a seed).

Run by hand: ``python -m services.dev.redis_cluster DATA_DIR PORT...`` (an even number of ports;
Ctrl-C stops the cluster).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.dev.probes import HOST, logger, tail

__all__ = ["RedisCluster", "RedisNode", "start_redis_cluster"]

_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 5.0
_READY_TIMEOUT = 60.0
_POLL = 0.05


def _find_binary(name: str) -> str:
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
    )
    if found is None:
        raise RuntimeError(
            f"{name} not found: install Debian's redis-server package "
            "(apt-get install redis-server)"
        )
    return found


def _client(port: int) -> redis.Redis:
    # No retries: while a node starts or fails over, a refused probe must come back at once so
    # the caller's own deadline governs the wait.
    return redis.Redis(
        host=HOST,
        port=port,
        socket_connect_timeout=1,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _text(client: redis.Redis, *command: str) -> str:
    # CLUSTER NODES / INFO as the raw text the server sends (no redis-py parsing of it).
    reply = client.execute_command(*command)  # type: ignore[no-untyped-call]
    if not isinstance(reply, str):
        raise RuntimeError(f"{' '.join(command)}: unexpected reply {type(reply).__name__}")
    return reply


def _info_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


@dataclass
class RedisNode:
    """One redis-server of the cluster: its port, cluster bus port, directory and process."""

    port: int
    bus_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class RedisCluster:
    """Handle on a running cluster started by :func:`start_redis_cluster`."""

    nodes: list[RedisNode]
    binary: str
    node_timeout_ms: int
    persistence: bool
    extra_config: dict[str, str] = field(default_factory=dict)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://h1:p1,h2:p2,...``: every node is a seed, so any one alive will do."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def node(self, port: int) -> RedisNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node of this cluster listens on {port}")

    # --- starting and stopping single nodes -------------------------------------------------

    def start_node(self, port: int, *, empty: bool = True) -> None:
        """Start the node on `port` again with its cluster identity (``nodes.conf``).

        `empty` removes its data files first, as a restart without persistence (or on a new
        disk) would; ``empty=False`` loads whatever snapshot the node's directory holds.
        """
        node = self.node(port)
        if node.running():
            raise RuntimeError(f"redis node {node.address} is already running")
        if empty:
            for name in ("dump.rdb", "appendonly.aof"):
                with contextlib.suppress(FileNotFoundError):
                    (node.directory / name).unlink()
            shutil.rmtree(node.directory / "appendonlydir", ignore_errors=True)
        self._spawn(node)
        self._wait_answers(node)

    def stop_node(self, port: int) -> None:
        """SIGTERM and wait: a clean shutdown (without saving, as ``save ""`` says)."""
        node = self.node(port)
        self._end(node, signal.SIGTERM)

    def kill_node(self, port: int) -> None:
        """SIGKILL: the node vanishes without a word, as a crashed host would."""
        node = self.node(port)
        self._end(node, signal.SIGKILL)

    def restart_node(self, port: int, *, empty: bool = True, kill: bool = False) -> None:
        """Stop (or kill) the node on `port` and start it again at once, empty by default."""
        if kill:
            self.kill_node(port)
        else:
            self.stop_node(port)
        self.start_node(port, empty=empty)

    def snapshot(self, port: int) -> None:
        """Write the node's data to its ``dump.rdb`` now; ``start_node(empty=False)`` loads it."""
        with contextlib.closing(_client(port)) as client:
            client.save()

    def pause(self, port: int) -> None:
        """SIGSTOP: the node stays bound to its port but answers nothing."""
        proc = self.node(port).proc
        if proc is not None:
            proc.send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        proc = self.node(port).proc
        if proc is not None:
            proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL for one that does not go)."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.resume(node.port)
            self._end(node, signal.SIGTERM)

    # --- what the cluster looks like ------------------------------------------------------------

    def primaries(self) -> list[int]:
        """Ports of the primaries that serve slots now, as a running node sees them."""
        return sorted(port for port, role in self.roles().items() if role == "master")

    def replica_of(self, primary_port: int) -> list[int]:
        """Ports of the replicas of the primary on `primary_port`."""
        nodes = self._cluster_nodes()
        ids = {port: node_id for node_id, port, _flags, _master, _slots in nodes}
        primary_id = ids.get(primary_port)
        return sorted(
            port
            for _id, port, flags, master, _slots in nodes
            if master == primary_id and "slave" in flags
        )

    def roles(self) -> dict[int, str]:
        """port -> "master" / "slave" for every node a running node knows as not failed."""
        roles: dict[int, str] = {}
        for _node_id, port, flags, _master, slots in self._cluster_nodes():
            if "fail" in flags.split(",") or "fail?" in flags.split(","):
                continue
            if "master" in flags:
                if slots:
                    roles[port] = "master"
            else:
                roles[port] = "slave"
        return roles

    def primary_for_slot(self, slot: int) -> int:
        for _node_id, port, flags, _master, slots in self._cluster_nodes():
            if "master" not in flags or "fail" in flags.split(","):
                continue
            for start, end in slots:
                if start <= slot <= end:
                    return port
        raise LookupError(f"no primary serves slot {slot}")

    def _cluster_nodes(self) -> list[tuple[str, int, str, str, list[tuple[int, int]]]]:
        last: Exception | None = None
        for node in self.nodes:
            if not node.running():
                continue
            try:
                with contextlib.closing(_client(node.port)) as client:
                    text = _text(client, "CLUSTER", "NODES")
            except (redis.RedisError, OSError) as exc:
                last = exc
                continue
            return _parse_cluster_nodes(text)
        raise RuntimeError(f"no node of the cluster answers CLUSTER NODES: {last}")

    def wait_ok(self, timeout: float = _READY_TIMEOUT) -> None:
        """Until every running node says ``cluster_state:ok``, knows every node, and sees as
        many serving primaries as the cluster was made with, each replica's link up."""
        deadline = time.monotonic() + timeout
        want_primaries = len(self.nodes) // 2
        problem: str | None = "not asked yet"
        while time.monotonic() < deadline:
            problem = self._not_ok(want_primaries)
            if problem is None:
                return
            time.sleep(_POLL * 4)
        raise TimeoutError(f"redis cluster on {self.ports} not ok after {timeout:.0f}s: {problem}")

    def _not_ok(self, want_primaries: int) -> str | None:
        running = [node for node in self.nodes if node.running()]
        for node in running:
            try:
                with contextlib.closing(_client(node.port)) as client:
                    info = _info_fields(_text(client, "CLUSTER", "INFO"))
                    replication = client.info("replication")
            except (redis.RedisError, OSError) as exc:
                return f"{node.address}: {exc}"
            if info.get("cluster_state") != "ok":
                return f"{node.address}: cluster_state:{info.get('cluster_state')}"
            if info.get("cluster_known_nodes") != str(len(self.nodes)):
                return f"{node.address}: knows {info.get('cluster_known_nodes')} nodes"
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return f"{node.address}: replica link {replication.get('master_link_status')}"
        try:
            serving = self.primaries()
        except RuntimeError as exc:
            return str(exc)
        if len(serving) != want_primaries:
            return f"{len(serving)} primaries serve slots, want {want_primaries}"
        return None

    # --- processes ------------------------------------------------------------------------------

    def _spawn(self, node: RedisNode) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "bind": HOST,
            "port": str(node.port),
            "cluster-enabled": "yes",
            "cluster-port": str(node.bus_port),
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(self.node_timeout_ms),
            "dir": str(node.directory),
            "dbfilename": "dump.rdb",
            "appendonly": "yes" if self.persistence else "no",
            "save": "3600 1 300 100 60 10000" if self.persistence else "",
            "maxmemory-policy": "noeviction",
            "daemonize": "no",
            "protected-mode": "no",
            "logfile": "",
            **self.extra_config,
        }
        argv = [self.binary]
        for key, value in config.items():
            argv += [f"--{key}", value]
        with node.log_file.open("ab") as log:
            node.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for the services must not take the cluster
                # away while they drain; stop() ends it afterwards.
                start_new_session=True,
            )
        logger().info("redis_cluster.node_started", port=node.port, pid=node.proc.pid)

    def _wait_answers(self, node: RedisNode) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if node.proc is None or node.proc.poll() is not None:
                code = node.proc.returncode if node.proc is not None else None
                raise RuntimeError(
                    f"redis-server on {node.address} exited with {code}; "
                    f"last lines of {node.log_file}:\n{tail(node.log_file)}"
                )
            try:
                with contextlib.closing(_client(node.port)) as client:
                    if client.ping():
                        return
            except redis.BusyLoadingError:
                pass
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"redis-server on {node.address} did not answer PING within "
                    f"{_START_TIMEOUT:.0f}s; last lines of {node.log_file}:\n{tail(node.log_file)}"
                )
            time.sleep(_POLL)

    def _end(self, node: RedisNode, sig: signal.Signals) -> None:
        proc = node.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(sig)
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=_STOP_TIMEOUT)
        logger().info("redis_cluster.node_ended", port=node.port, signal=sig.name)


def _parse_cluster_nodes(text: str) -> list[tuple[str, int, str, str, list[tuple[int, int]]]]:
    """(node id, port, flags, master id or "-", slot ranges) per line of CLUSTER NODES."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_id, address, flags, master = parts[0], parts[1], parts[2], parts[3]
        # "127.0.0.1:7000@17000" (a hostname may follow after a comma)
        port = int(address.split("@", 1)[0].rsplit(":", 1)[1] or 0)
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):
                continue  # a slot being migrated or imported
            start, _, end = item.partition("-")
            slots.append((int(start), int(end or start)))
        nodes.append((node_id, port, flags, master, slots))
    return nodes


def start_redis_cluster(
    data_dir: Path,
    ports: Sequence[int],
    *,
    bus_ports: Sequence[int] | None = None,
    node_timeout_ms: int = 2000,
    persistence: bool = False,
    extra_config: dict[str, str] | None = None,
    binary: str | None = None,
) -> RedisCluster:
    """Start ``len(ports)`` nodes and make a cluster of them: half primaries, one replica each.

    `bus_ports` default to ``port + 10000`` (Redis's own rule); a caller picking free ports
    should pick the bus ports too. Any node left from an earlier run in `data_dir` is wiped:
    this makes a fresh cluster every time. On failure every node started is stopped again.
    """
    if len(ports) < 6 or len(ports) % 2:
        raise ValueError(
            "a cluster of primaries with one replica each needs an even number (>= 6) of ports"
        )
    buses = list(bus_ports) if bus_ports is not None else [port + 10000 for port in ports]
    if len(buses) != len(ports):
        raise ValueError("give one cluster bus port per port")
    server = binary or _find_binary("redis-server")
    cli = _find_binary("redis-cli")
    nodes = []
    for port, bus in zip(ports, buses, strict=True):
        directory = Path(data_dir) / f"node-{port}"
        shutil.rmtree(directory, ignore_errors=True)
        nodes.append(RedisNode(port=port, bus_port=bus, directory=directory))
    cluster = RedisCluster(
        nodes=nodes,
        binary=server,
        node_timeout_ms=node_timeout_ms,
        persistence=persistence,
        extra_config=dict(extra_config or {}),
    )
    try:
        for node in nodes:
            cluster._spawn(node)
        for node in nodes:
            cluster._wait_answers(node)
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(node.address for node in nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_READY_TIMEOUT,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({created.returncode}):\n"
                f"{created.stdout}\n{created.stderr}"
            )
        cluster.wait_ok()
    except BaseException:
        cluster.stop()
        raise
    logger().info("redis_cluster.ready", ports=cluster.ports, primaries=cluster.primaries())
    return cluster


def main(argv: Sequence[str]) -> int:
    if len(argv) < 8:
        print(
            "usage: python -m services.dev.redis_cluster DATA_DIR PORT... (six or more, even)",
            file=sys.stderr,
        )
        return 2
    # While the nodes start, SIGTERM ends the start as Ctrl-C does (start_redis_cluster stops
    # every node it started). Signals are blocked for sigwait only afterwards: a node inherits
    # its parent's signal mask, and one started with SIGTERM blocked ignores it, so every stop
    # waited out _STOP_TIMEOUT and ended in SIGKILL.
    signal.signal(signal.SIGTERM, _terminated)
    cluster = start_redis_cluster(Path(argv[1]), [int(port) for port in argv[2:]])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    print(cluster.url, flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


def _terminated(_signum: int, _frame: object) -> None:
    raise SystemExit(128 + signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

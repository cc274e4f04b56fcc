"""Every redis-py client of every service, made from REDIS_URL: one node, a Cluster or Sentinel.

- ``redis://``, ``rediss://``, ``unix://``: one Redis, ``Redis.from_url`` exactly as before (no
  extra work per command, so `make dev`, the tests and the bench run as they did).
- ``redis+cluster://[user:password@]h1:p1,h2:p2,.../`` : a Redis Cluster through redis-py's
  ``RedisCluster``, seeded with every node given (any one alive finds the others); commands are
  routed by key slot and MOVED/ASK are followed by redis-py. The key space is laid out for it
  (libs/common/keys.py): every script's and multi-key command's keys share a slot.
- ``redis+sentinel://[user:password@]h1:p1,h2:p2/<master name>[/<db>]``: the sentinels are
  asked for the master of that name (``Sentinel.master_for``), and asked again on every new
  connection, so a failover moves the client with it.

:func:`parse` checks a URL without connecting (config.py calls it at start, so a bad REDIS_URL
stops the process naming the variable); :func:`connect` makes the client.

A Cluster client is handed out typed as ``redis.asyncio.Redis``: the services use the commands
both share (get/set, streams, pipelines without transactions, scripts, scan_iter), and the
key space, not the type, is what makes them correct on a Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

__all__ = ["RedisTarget", "connect", "is_cluster", "parse"]

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
SCHEMES = (*SINGLE_SCHEMES, CLUSTER_SCHEME, SENTINEL_SCHEME)

Kind = Literal["single", "cluster", "sentinel"]


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a REDIS_URL names. `nodes`: the Cluster's seed nodes or the sentinels."""

    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None


def _hosts(netloc: str, scheme: str) -> tuple[tuple[str, int], ...]:
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if item.startswith("["):  # [::1]:7000
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{scheme}:// wants host:port[,host:port...], got {item!r}")
        hosts.append((host, int(port_text)))
    return tuple(hosts)


def parse(url: str) -> RedisTarget:
    """The target of `url`; ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ValueError(f"must be a URL with scheme {', '.join(s + '://' for s in SCHEMES)}")
    if scheme in SINGLE_SCHEMES:
        if not parts.netloc and not (scheme == "unix" and parts.path):
            raise ValueError(f"{scheme}:// needs a host")
        return RedisTarget("single", url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    if not hostlist:
        raise ValueError(f"{scheme}:// needs at least one host:port")
    nodes = _hosts(hostlist, scheme)
    path = [p for p in parts.path.split("/") if p]
    user, secret = unquote(username) or None, unquote(password) or None
    if scheme == CLUSTER_SCHEME:
        # A Cluster has database 0 only.
        if path and path != ["0"]:
            raise ValueError("redis+cluster:// has database 0 only")
        return RedisTarget("cluster", url, nodes, username=user, password=secret)
    if not path or len(path) > 2:
        raise ValueError("redis+sentinel:// wants /<master name>[/<db>] after the sentinels")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"redis+sentinel:// database must be a number, got {path[1]!r}")
        db = int(path[1])
    return RedisTarget(
        "sentinel", url, nodes, master=unquote(path[0]), db=db, username=user, password=secret
    )


def connect(
    url: str,
    *,
    decode_responses: bool = False,
    socket_timeout: float | None = None,
    socket_connect_timeout: float | None = None,
    health_check_interval: int = 30,
) -> redis.Redis:
    """A redis-py asyncio client for `url` (see the module docstring for the schemes)."""
    target = parse(url)
    options: dict[str, Any] = {
        "decode_responses": decode_responses,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "health_check_interval": health_check_interval,
    }
    if target.kind == "single":
        return redis.Redis.from_url(url, **options)
    credentials: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            **credentials,
            **options,
        )
        return cast(redis.Redis, cluster)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.nodes),
        sentinel_kwargs={
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
        },
        **credentials,
        **options,
    )
    master: redis.Redis = sentinel.master_for(target.master, redis_class=redis.Redis, db=target.db)
    return master


def is_cluster(client: redis.Redis) -> bool:
    return isinstance(client, RedisCluster)

"""Where deliveries leave from: every socket bound to WEBHOOK_EGRESS_IP (or sent through
WEBHOOK_EGRESS_PROXY), in one pooled session per process whose resolver and connector are the
SSRF guard's (`services/webhooks/ssrf.py`).
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from libs.common.config import ConfigError, Settings
from services.webhooks import ssrf


def egress_family(settings: Settings) -> socket.AddressFamily:
    ip = settings.webhooks.egress_ip
    if ip is None:
        return socket.AF_UNSPEC
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def check_egress(settings: Settings) -> None:
    """Fail at start, not at every delivery, when the egress address is not ours to bind."""
    ip = settings.webhooks.egress_ip
    if ip is None:
        return
    with socket.socket(egress_family(settings), socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError as exc:
            raise ConfigError(
                "WEBHOOK_EGRESS_IP", f"{ip} is not an address of this host ({exc.strerror})"
            ) from None


def make_resolver(
    settings: Settings, policy: ssrf.AddressPolicy, inner: AbstractResolver | None = None
) -> ssrf.GuardedResolver:
    """`inner` answers the names (the subscription checks ask the same one)."""
    proxy = settings.webhooks.egress_proxy
    exempt = [urlsplit(proxy).hostname or ""] if proxy else []
    return ssrf.GuardedResolver(policy, exempt=exempt, inner=inner)


def make_session(settings: Settings, resolver: ssrf.GuardedResolver) -> aiohttp.ClientSession:
    """One pooled session per process: keep-alive per endpoint, every socket bound to the
    egress address, names resolved only to allowed addresses, and every connection's peer
    judged by the resolver's policy before a request goes out on it."""
    egress = settings.webhooks.egress_ip
    connector = ssrf.GuardedConnector(
        resolver.policy,
        proxy=settings.webhooks.egress_proxy,
        resolver=resolver,
        family=egress_family(settings),
        local_addr=(egress, 0) if egress else None,
        limit=settings.webhooks.max_in_flight,
        limit_per_host=0,
        keepalive_timeout=30,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        # Proxy variables of the environment must not redirect deliveries.
        trust_env=False,
        # Bodies are only excerpted: leave them as sent, and ask for no compression.
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    )

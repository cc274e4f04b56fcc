"""Server-side request forgery guards: a webhook URL must never reach inside our network.

Every check judges the host exactly as the HTTP client will dial it: yarl (which aiohttp
parses every URL with) folds the typed host with IDNA/UTS 46 and NFKC, so `127。0。0。1`,
`①②⑦.0.0.1` and `ｌｏｃａｌｈｏｓｔ` are dialled as `127.0.0.1` and `localhost`. `target` takes
that folded host once, and aiohttp's own test of whether it is an address literal.

Checked three times. When a subscription is made or changed: the URL's form, the address
literal, or every address its name resolves to now (a name that does not resolve is refused).
At delivery, before connecting: a literal is judged, and the connector's resolver drops
every forbidden address a name resolves to, so a name that resolved to a public address at
subscribe time and to 10.0.0.1 now (DNS rebinding) connects nowhere. After connecting: the
socket's peer, whatever path led to it, before a byte of the request is sent (the egress
proxy's own address aside; that path pins the address it hands the proxy).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.helpers import is_canonical_ipv4_address, is_ip_address
from aiohttp.resolver import ThreadedResolver
from aiohttp.tracing import Trace
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
# A host name as DNS carries it (RFC 1123 labels; underscores occur in real names), after
# yarl's IDNA encoding: anything else (percent-encoding, brackets, stray punctuation) is no
# name a resolver should be asked about.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")

# Instance metadata services answer credentials to whoever asks from inside the VM.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IPv6 prefixes that carry an IPv4 address inside: NAT64 (RFC 6052, RFC 8215).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class UnsafeUrl(ValueError):
    """A webhook URL refused before any request: the text says why, for the API answer."""


class BlockedAddress(OSError):
    """Every address a host resolved to is forbidden. An OSError, so aiohttp reports it as a
    connection failure of that attempt and the sender can name the reason."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host} refused: {reason}")
        self.host = host
        self.reason = reason


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    for network in _NAT64:
        if address in network:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    allow_loopback: bool = False

    def problem(self, address: str | IPAddress) -> str | None:
        """Why a target address is forbidden, None when it is a fine public address."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return "not an IP address"
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.scope_id:
                return "a scoped IPv6 address"
            embedded = _embedded_ipv4(ip)
            if embedded is not None:
                inner = self.problem(embedded)
                return f"{inner} (embedded in IPv6)" if inner else None
        if ip in _METADATA:
            return "a cloud metadata address"
        if ip.is_loopback:
            return None if self.allow_loopback else "a loopback address"
        if ip.is_unspecified:
            return "the unspecified address"
        if ip.is_multicast:
            return "a multicast address"
        if ip.is_link_local:
            return "a link-local address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
            # fec0::/10: deprecated (RFC 3879) but still routed inside some networks, and
            # not in the ipaddress module's private ranges.
            return "a site-local address"
        if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
            return "a shared (CGNAT) address"
        if ip.is_private:
            return "a private address"
        if ip.is_reserved or not ip.is_global:
            return "not a public address"
        return None


@dataclass(frozen=True, slots=True)
class Target:
    """A URL as the HTTP client will use it."""

    url: URL
    # The host it dials: the folded, lower-case ASCII name, or the address literal.
    host: str
    port: int
    # Set when `host` is an address literal, which aiohttp connects to without a resolver.
    address: IPAddress | None


@functools.lru_cache(maxsize=4096)
def target(raw: str) -> Target:
    """Parse `raw` as aiohttp will (`yarl.URL`), and take the host its connector dials.
    Refuses (UnsafeUrl) what the connector would refuse, and what cannot be judged."""
    try:
        url = URL(raw)
        port = url.port
    except ValueError:
        raise UnsafeUrl("url is not a valid URL") from None
    host = url.raw_host or ""
    # The connector makes a run of trailing dots one before it dials.
    if host.endswith(".."):
        host = host.rstrip(".") + "."
    if not url.absolute or not host:
        raise UnsafeUrl("url must name a host")
    if port is None or not 0 < port < 65536:
        raise UnsafeUrl("url has an invalid port")
    if not is_ip_address(host):  # the connector's own test: a name goes to the resolver
        return Target(url, host, port, None)
    if "%" in host:
        raise UnsafeUrl("url points at a scoped IPv6 address")
    # The connector refuses legacy IPv4 forms (2130706433, 0177.0.0.1, 127.1, 127.0.0.1.),
    # which socket calls would map onto an address.
    if ":" not in host and not is_canonical_ipv4_address(host):
        raise UnsafeUrl("url host must be a DNS name or a standard IP address")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UnsafeUrl("url host is not a valid IP address") from None
    return Target(url, host, port, address)


def _check_name(name: str, policy: AddressPolicy) -> None:
    bare = name[:-1] if name.endswith(".") else name
    labels = bare.split(".")
    if len(bare) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise UnsafeUrl("url host is not a valid DNS name")
    # Hex and octal forms (0x7f.1, 0x7f000001) are names to the connector, but the system
    # resolver reads them as addresses; no real host name is all numbers.
    if all(label.isdigit() or label.startswith("0x") for label in labels):
        raise UnsafeUrl("url host must be a DNS name or a standard IP address")
    if (bare == "localhost" or bare.endswith(".localhost")) and not policy.allow_loopback:
        raise UnsafeUrl("url points at a loopback address")


def check_url(url: str, policy: AddressPolicy, *, require_https: bool) -> str:
    """The URL's form: scheme, no credentials, a host that is not a forbidden address."""
    if not isinstance(url, str) or not url:
        raise UnsafeUrl("url is required")
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"url must be at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UnsafeUrl("url must not contain spaces or control characters")
    allowed = ("https",) if require_https else ("http", "https")
    try:
        scheme = URL(url).scheme
    except ValueError:
        raise UnsafeUrl("url is not a valid URL") from None
    if scheme not in allowed:
        raise UnsafeUrl(f"url must use {' or '.join(allowed)}")
    found = target(url)
    if "@" in (found.url.raw_authority or "") or found.url.raw_user is not None:
        raise UnsafeUrl("url must not carry credentials")
    if found.address is None:
        _check_name(found.host, policy)
        return url
    reason = policy.problem(found.address)
    if reason:
        raise UnsafeUrl(f"url points at {reason}")
    return url


async def check_resolved(
    url: str,
    policy: AddressPolicy,
    *,
    resolver: AbstractResolver | None = None,
    timeout: float = 3.0,
) -> None:
    """Every address the URL's host resolves to now is allowed, asked of the resolver
    deliveries use. A name that does not resolve is refused: nothing it might later point
    at can be judged now."""
    found = target(url)
    if found.address is not None:
        return
    resolver = resolver or ThreadedResolver()
    try:
        results = await asyncio.wait_for(
            resolver.resolve(found.host, found.port, socket.AF_UNSPEC), timeout
        )
    except (OSError, TimeoutError, UnicodeError):
        results = []
    if not results:
        raise UnsafeUrl("url host does not resolve")
    for result in results:
        reason = policy.problem(result["host"])
        if reason:
            raise UnsafeUrl(f"url host resolves to {reason}")


@functools.lru_cache(maxsize=4096)
def _problem(address: str | IPAddress, policy: AddressPolicy) -> str | None:
    return policy.problem(address)


def check_target(found: Target, policy: AddressPolicy) -> None:
    """At delivery: an address literal, which aiohttp connects to without any resolver.
    The verdict for a given address never changes, so it is computed once."""
    if found.address is not None:
        reason = _problem(found.address, policy)
        if reason:
            raise BlockedAddress(found.host, reason)


class GuardedResolver(AbstractResolver):
    """Resolves, drops forbidden addresses, and returns only the allowed ones.

    `exempt` hosts (the configured egress proxy) are operator-chosen and may be private.
    """

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        exempt: Collection[str] = (),
        inner: AbstractResolver | None = None,
    ) -> None:
        self._policy = policy
        self._exempt = frozenset(h.lower() for h in exempt)
        self._owns_inner = inner is None
        self._inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() in self._exempt:
            return results
        allowed: list[ResolveResult] = []
        reason = "no address"
        for result in results:
            problem = self._policy.problem(result["host"])
            if problem is None:
                allowed.append(result)
            else:
                reason = problem
        if not allowed:
            raise BlockedAddress(host, f"resolves to {reason}")
        return allowed

    @property
    def policy(self) -> AddressPolicy:
        return self._policy

    async def resolve_one(self, host: str, port: int, family: socket.AddressFamily) -> str:
        """The first allowed address, for pinning a request sent through the proxy. Never
        exempt: a webhook naming the proxy's own host is judged like any other."""
        for result in await self._inner.resolve(host, port, family):
            if self._policy.problem(result["host"]) is None:
                return result["host"]
        raise BlockedAddress(host, "resolves to no allowed address")

    async def close(self) -> None:
        # A resolver handed in is shared (with the subscription checks) and closed by its owner.
        if self._owns_inner:
            await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """Judges the address each request's connection is actually made to, before the request
    is written: literals, resolved names, cached answers, pooled connections alike, so a host
    the checks above read differently from the connector still reaches nothing forbidden.

    Requests through `proxy` (the configured egress proxy) are connected to the proxy, an
    operator-chosen address that may be private; they are pinned to a checked address.
    """

    def __init__(self, policy: AddressPolicy, *, proxy: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._policy = policy
        self._proxy = URL(proxy) if proxy else None

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        if self._proxy is not None and req.proxy == self._proxy:
            return connection
        transport = connection.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        # Unknown is refused: the request goes nowhere its address was not judged.
        reason = _problem(str(peer[0]), self._policy) if peer else "an unknown address"
        if reason:
            connection.close()
            blocked = BlockedAddress(req.url.raw_host or "", f"connected to {reason}")
            raise aiohttp.ClientConnectorError(req.connection_key, blocked)
        return connection

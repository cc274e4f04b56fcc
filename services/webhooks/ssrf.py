"""Server-side request forgery guards: a webhook URL must never reach inside our network.

Checked twice. When a subscription is made or changed, the URL's form and (if it resolves)
every address its host names. At delivery, on the address actually connected to: the
connector's resolver resolves, drops every forbidden address and hands aiohttp only what
is left, so a name that resolved to a public address at subscribe time and to 10.0.0.1 now
(DNS rebinding) connects nowhere. IP literals never reach a resolver; the sender checks them
before connecting.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048

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


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_url(url: str, policy: AddressPolicy, *, require_https: bool) -> str:
    """The URL's form: scheme, no credentials, a host that is not a forbidden address."""
    if not isinstance(url, str) or not url:
        raise UnsafeUrl("url is required")
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"url must be at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UnsafeUrl("url must not contain spaces or control characters")
    parts = urlsplit(url)
    allowed = ("https",) if require_https else ("http", "https")
    if parts.scheme not in allowed:
        raise UnsafeUrl(f"url must use {' or '.join(allowed)}")
    if "@" in parts.netloc:
        raise UnsafeUrl("url must not carry credentials")
    host = parts.hostname
    if not host:
        raise UnsafeUrl("url must name a host")
    try:
        _ = parts.port
    except ValueError:
        raise UnsafeUrl("url has an invalid port") from None
    literal = _literal(host)
    if literal is not None:
        reason = policy.problem(literal)
        if reason:
            raise UnsafeUrl(f"url points at {reason}")
        return url
    # Legacy numeric forms (2130706433, 0x7f.1, 127.1) resolve to addresses while looking
    # like names; no real host name is all digits and dots.
    if all(label.isdigit() or label.lower().startswith("0x") for label in host.split(".")):
        raise UnsafeUrl("url host must be a DNS name or a standard IP address")
    if (host == "localhost" or host.endswith(".localhost")) and not policy.allow_loopback:
        raise UnsafeUrl("url points at a loopback address")
    try:
        host.encode("idna")
    except UnicodeError:
        raise UnsafeUrl("url host is not a valid DNS name") from None
    return url


async def check_resolved(url: str, policy: AddressPolicy, *, timeout: float = 3.0) -> None:
    """Every address the URL's host resolves to now is allowed. A name that does not resolve
    yet passes: the delivery-time check still guards the connection."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _literal(host) is not None:
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM), timeout
        )
    except (OSError, TimeoutError, UnicodeError):
        return
    for info in infos:
        reason = policy.problem(str(info[4][0]))
        if reason:
            raise UnsafeUrl(f"url host resolves to {reason}")


@functools.lru_cache(maxsize=4096)
def _literal_problem(host: str, policy: AddressPolicy) -> str | None:
    literal = _literal(host.strip("[]"))
    return policy.problem(literal) if literal is not None else None


def check_target(host: str, policy: AddressPolicy) -> None:
    """At delivery: an IP-literal host, which aiohttp connects to without any resolver.
    The verdict for a given text never changes, so it is computed once."""
    reason = _literal_problem(host, policy)
    if reason:
        raise BlockedAddress(host, reason)


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

    async def resolve_one(self, host: str, port: int, family: socket.AddressFamily) -> str:
        """The first allowed address, for pinning a connection made through a proxy."""
        return (await self.resolve(host, port, family))[0]["host"]

    async def close(self) -> None:
        await self._inner.close()

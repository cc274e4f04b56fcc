"""Who called and by which name: the Host, the client's address and the scheme of a call, from
the request itself or, only behind a trusted proxy, from its `X-Forwarded-*` headers.

`GATEWAY_TRUST_FORWARDED` (a proxy that overwrites `X-Forwarded-Host` and `-Proto`) lets the
Host, scheme and client address come from them; a peer in `GATEWAY_TRUSTED_PROXIES` (load
balancers that append to `X-Forwarded-For`) lets the client be the right-most address outside
those networks, the Host staying the request's own. Otherwise the socket's peer is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

from services.gateway import proxy
from services.gateway.context import GatewayContext

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def host_of(request: web.Request, ctx: GatewayContext) -> str:
    """The Host the caller asked for, lower-cased: the school is chosen by it."""
    if ctx.settings.gateway.trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-Host")
        if forwarded:
            return forwarded.split(",")[0].strip().lower()
    return request.host.lower()


def _within(address: str | None, networks: Sequence[IPNetwork]) -> bool:
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _caller(request: web.Request, trusted: Sequence[IPNetwork]) -> str | None:
    """The right-most X-Forwarded-For hop outside the trusted networks: proxies append, so
    everything left of what they added is the caller's word. The peer when there is none."""
    hops = ",".join(request.headers.getall("X-Forwarded-For", ())).split(",")
    for hop in reversed(hops):
        try:
            ip = ipaddress.ip_address(hop.strip())
        except ValueError:
            break
        if not any(ip in network for network in trusted):
            return str(ip)
    return request.remote


def forwarding(request: web.Request, ctx: GatewayContext, host: str) -> proxy.Forwarding:
    """Who called, as the gateway will tell upstreams (and the audit trail).

    The gateway is the edge: it SETS X-Forwarded-For to the one address it knows, never
    appends to what a caller wrote. Only from a trusted proxy (GATEWAY_TRUST_FORWARDED, or a
    peer in GATEWAY_TRUSTED_PROXIES) does it take the caller and scheme from X-Forwarded-*.
    """
    policy = ctx.settings.gateway
    if not (policy.trust_forwarded or _within(request.remote, policy.trusted_proxies)):
        # The peer address comes from the socket: already an IP, no parsing needed.
        return proxy.Forwarding(request.remote, request.scheme, host)
    proto = request.scheme
    # A proxy sets the scheme it was reached by (or appends it: the last is its own).
    forwarded_proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip()
    if forwarded_proto in ("http", "https"):
        proto = forwarded_proto
    return proxy.Forwarding(_caller(request, policy.trusted_proxies), proto, host)

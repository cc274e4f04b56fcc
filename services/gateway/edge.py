"""The gateway's aiohttp application shell: libs.common.web's `/healthz`, `/readyz`,
`/metrics` and request context, with a request middleware made for the gateway's call rate.

libs.common.web.request_context does the same work per request, but looks its Prometheus
children up by four labels on every call and draws each request id from the OS; at the rate
one gateway process proxies, that is a measurable share of a call's CPU. Here the labelled
children are resolved once per (method, route, status) and request ids are a random
per-process prefix and a counter: unique, not secret (they travel in headers anyway).

The process also settles its garbage collector once started (libs.common.web.settle_gc, as
every service does).
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from libs.common.errors import json_response
from libs.common.logging import get_logger
from libs.common.web import (
    ACCESS_LOG,
    LIVENESS,
    METRICS,
    READINESS,
    REQUEST_ID_KEY,
    Handler,
    ServiceMetrics,
    healthz,
    log_access,
    metrics_endpoint,
    readyz,
    restore_gc,
    settle_gc,
)

log = get_logger(__name__)

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Cleared by the middleware after each request: a connection's requests share one task, and
# so one context.
_CONTEXT_KEYS = ("request_id", "school", "client_id")


class _RequestIds:
    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


class _Children:
    """Prometheus children of ServiceMetrics, resolved once per label combination."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[str, Any] = {}

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        counter = self._requests.get((method, route, status))
        if counter is None:
            m = self._metrics
            counter = m.requests.labels(m.service, method, route, str(status))
            self._requests[(method, route, status)] = counter
        counter.inc()
        histogram = self._latency.get(route)
        if histogram is None:
            m = self._metrics
            histogram = self._latency[route] = m.latency.labels(m.service, route)
        histogram.observe(seconds)


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def application(
    service: str,
    *,
    middlewares: list[Any] | None = None,
    public: Callable[[str], bool] | None = None,
    access_log: bool = True,
) -> web.Application:
    """As libs.common.web.base_application, with the gateway's request middleware.

    `public(host)` names the hosts the internet reaches: there `/readyz` (a PostgreSQL, Redis
    and identity round trip per call, unthrottled) and `/metrics` (the traffic of every school)
    answer 404; probes and scrapers call the process by its own address."""
    metrics = ServiceMetrics(service)
    children = _Children(metrics)
    ids = _RequestIds()
    bind = structlog.contextvars.bind_contextvars
    unbind = structlog.contextvars.unbind_contextvars
    perf = time.perf_counter

    @web.middleware
    async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        """A request id for every request (the caller's if well-formed), bound into every log."""
        incoming = request.headers.get("X-Request-Id")
        safe = incoming is not None and _SAFE_REQUEST_ID.match(incoming) is not None
        request_id = incoming if safe and incoming else ids.next()
        request[REQUEST_ID_KEY] = request_id
        bind(request_id=request_id)
        started = perf()
        status = 500
        try:
            response = await handler(request)
            status = response.status
        except web.HTTPException as exc:
            status = exc.status
            exc.headers["X-Request-Id"] = request_id
            raise
        except Exception:
            log.exception("request_failed", method=request.method, path=request.path)
            response = json_response(
                {"error": "server_error", "error_description": "An unexpected error occurred."},
                status=500,
            )
        finally:
            elapsed = perf() - started
            children.record(request.method, _route_name(request), status, elapsed)
            if access_log:
                log_access(request, status, elapsed)
            unbind(*_CONTEXT_KEYS)
        response.headers["X-Request-Id"] = request_id
        return response

    app = web.Application(middlewares=[request_context, *(middlewares or [])])
    app[METRICS] = metrics
    app[ACCESS_LOG] = access_log
    app[READINESS] = {}
    app[LIVENESS] = {}
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", _operators_only(readyz, public))
    app.router.add_get("/metrics", _operators_only(metrics_endpoint, public))
    app.on_startup.append(settle_gc)
    app.on_cleanup.append(restore_gc)
    return app


def _operators_only(handler: Handler, public: Callable[[str], bool] | None) -> Handler:
    if public is None:
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        if not _by_address(request, public):
            return json_response(
                {"error": "not_found", "error_description": "No such route."}, status=404
            )
        return await handler(request)

    return guarded


def _by_address(request: web.Request, public: Callable[[str], bool]) -> bool:
    """Whether the call names the process by its address, as probes and scrapers do (the pod's
    IP, `localhost`, or no Host at all): the internet reaches the gateway by name only. An
    allowlist, since a name the routes do not serve may still pass a load balancer that
    ignores what they look at (a port, a trailing dot)."""
    if "X-Forwarded-Host" in request.headers:
        return False
    host = request.headers.get("Host")
    if host is None:
        return True
    host = host.strip()
    if public(host):
        return False
    try:
        parts = urlsplit("//" + host)
        name, _ = parts.hostname, parts.port  # a port that is not one raises
    except ValueError:
        return False
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name or "")
    except ValueError:
        return False
    return True

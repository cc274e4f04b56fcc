"""What every service's aiohttp application has: request ids and context in the logs,
`/healthz`, `/readyz`, `/metrics`, JSON error pages, and a runner that shuts down gracefully."""

from __future__ import annotations

import asyncio
import gc
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import generate_latest as prometheus_latest
from redis.exceptions import RedisError

from libs.common.errors import json_response
from libs.common.logging import access_logger, get_logger

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ReadinessCheck = Callable[[], Awaitable[bool]]

READINESS = web.AppKey("readiness_checks", dict[str, ReadinessCheck])
# Liveness: cheap in-process checks (a supervised background loop died); /healthz answers 503
# when one fails, so the orchestrator restarts the process.
LIVENESS = web.AppKey("liveness_checks", dict[str, Callable[[], bool]])
REQUEST_ID_KEY = web.RequestKey("request_id", str)
ACCESS_LOG = web.AppKey("access_log", bool)

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ServiceMetrics:
    """Prometheus metrics of one service, in a registry of its own (tests run many apps)."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered",
            ["service", "method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["service", "route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.service = service
        self.pool_connections = Gauge(
            "db_pool_connections",
            "PostgreSQL connections of the process's asyncpg pools, by pool and state",
            ["pool", "state"],  # state: in_use | idle
            registry=self.registry,
        )
        self.pool_max = Gauge(
            "db_pool_max_connections",
            "The most connections each asyncpg pool may open",
            ["pool"],
            registry=self.registry,
        )
        # The process's CPU, memory, open files and start time, and the interpreter's: read
        # at each scrape, nothing per request.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)


METRICS: web.AppKey[ServiceMetrics] = web.AppKey("metrics")


def watch_pool(metrics: ServiceMetrics, name: str, pool: Any) -> None:
    """Report an asyncpg pool's connections at each scrape (in use, idle, the most allowed)."""
    metrics.pool_connections.labels(name, "in_use").set_function(
        lambda: pool.get_size() - pool.get_idle_size()
    )
    metrics.pool_connections.labels(name, "idle").set_function(pool.get_idle_size)
    metrics.pool_max.labels(name).set_function(pool.get_max_size)


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request id for every request (the caller's if well-formed), bound into every log."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else secrets.token_hex(12)
    request[REQUEST_ID_KEY] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    metrics = request.app.get(METRICS)
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        exc.headers["X-Request-Id"] = request_id
        raise
    except RedisError:
        # Redis away, or a revocation no gateway lease confirmed in time (leases.py): what
        # was written stays written, and the same request may be sent again.
        log.warning("request_unavailable", method=request.method, path=request.path, exc_info=True)
        status = 503
        response = json_response(
            {
                "error": "temporarily_unavailable",
                "error_description": "A service this request needs did not answer; retry.",
            },
            status=503,
        )
        response.headers["Retry-After"] = "1"
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        response = json_response(
            {"error": "server_error", "error_description": "An unexpected error occurred."},
            status=500,
        )
    finally:
        elapsed = time.perf_counter() - started
        if metrics is not None:
            route = _route_name(request)
            metrics.requests.labels(metrics.service, request.method, route, str(status)).inc()
            metrics.latency.labels(metrics.service, route).observe(elapsed)
        if request.app.get(ACCESS_LOG, True):
            log_access(request, status, elapsed)
        structlog.contextvars.unbind_contextvars("request_id", "school", "client_id")
    response.headers["X-Request-Id"] = request_id
    return response


def log_access(request: web.Request, status: int, seconds: float) -> None:
    """The access log line: the path without its query (a query may hold a signature, a code
    or a state), never a header; request id, school and client come from the bound context,
    the trace id from the tracing processor."""
    access_logger().info(
        "access",
        method=request.method,
        path=request.path,
        status=status,
        duration_ms=round(seconds * 1000, 2),
    )


# aiohttp's own client errors by the `error` code the API services answer them with.
_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


@web.middleware
async def json_http_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 4xx answers (no such route, method not allowed, body too large) in the
    JSON error shape of every other error an API service gives, instead of text/plain."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if not 400 <= exc.status < 500:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        error = _HTTP_ERROR_CODES.get(exc.status, "invalid_request")
        return json_response({"error": error}, status=exc.status, headers=headers)


async def healthz(request: web.Request) -> web.Response:
    failed = sorted(name for name, check in request.app.get(LIVENESS, {}).items() if not check())
    if failed:
        return json_response({"status": "failing", "failed": failed}, status=503)
    return json_response({"status": "ok"})


def watch_background(app: web.Application, supervisor: Any, name: str = "background") -> None:
    """Let /healthz and /readyz reflect a libs.common.tasks.Supervisor's loops."""
    app[LIVENESS][name] = supervisor.alive

    async def ready() -> bool:
        return bool(supervisor.ready())

    app[READINESS][name] = ready


async def readyz(request: web.Request) -> web.Response:
    checks = request.app.get(READINESS, {})
    results = {}
    for name, check in checks.items():
        try:
            results[name] = await asyncio.wait_for(check(), timeout=2)
        except (TimeoutError, OSError, ConnectionError):
            results[name] = False
    ready = all(results.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", "checks": results},
        status=200 if ready else 503,
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    return web.Response(
        body=prometheus_latest(metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


# Gen0 collections are cheap, but at the default threshold (700 net new container objects) a
# service under load runs one every few dozen calls, and every tenth promotes in-flight calls'
# objects to older generations that a full collection then has to walk again.
GEN0_THRESHOLD = 7000
_GC_STATE: web.AppKey[tuple[int, int, int]] = web.AppKey("gc_thresholds")


async def settle_gc(app: web.Application) -> None:
    """Once everything is started (on_startup runs after the cleanup contexts): what exists now
    lives as long as the process. A full collection walks every tracked object, and a service
    with its imports holds well over 100,000 of them: tens of milliseconds, paid by whichever
    call is running, every few seconds under load (short-lived call objects promoted to the
    oldest generation count towards the next one). Frozen, they are never walked again.
    """
    gc.collect()
    gc.freeze()
    app[_GC_STATE] = gc.get_threshold()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


async def restore_gc(app: web.Application) -> None:
    # Tests run many applications in one process: leave the collector as it was found.
    previous = app.get(_GC_STATE)
    if previous is not None:
        gc.set_threshold(*previous)
    gc.unfreeze()


def base_application(
    service: str, *, middlewares: list[Any] | None = None, access_log: bool = True
) -> web.Application:
    app = web.Application(middlewares=[request_context, *(middlewares or [])])
    app[METRICS] = ServiceMetrics(service)
    app[ACCESS_LOG] = access_log
    app[READINESS] = {}
    app[LIVENESS] = {}
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.on_startup.append(settle_gc)
    app.on_cleanup.append(restore_gc)
    return app


async def serve(
    app: web.Application, host: str, port: int, *, shutdown_timeout: float = 20
) -> None:
    """Run until SIGINT/SIGTERM, then stop accepting, finish in-flight requests, clean up."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    await site.start()
    log.info("listening", host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting_down")
        await runner.cleanup()


async def answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send `response`, then close the connection at once, leaving the rest of the request's
    body unread: a body refused for its size must not be read after all (aiohttp would
    otherwise read and discard what is left, for up to its lingering time, to keep the
    connection alive)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.protocol is not None:
        request.protocol.force_close()
    return response

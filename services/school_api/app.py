"""The school API's aiohttp application: wiring only; the endpoints live in routes.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from libs.common import db, streams, tasks
from libs.common.config import Settings
from libs.common.logging import get_logger
from libs.common.web import (
    METRICS,
    READINESS,
    Handler,
    base_application,
    watch_background,
    watch_pool,
)
from services.school_api import identity, routes, storage_edge, store, upload_sweep
from services.school_api.context import CONTEXT, SchoolApiContext
from services.school_api.objectstore import open_store
from services.school_api.outbox import OutboxRelay, RelayMetrics
from services.school_api.responses import ApiError, conflict, json, validation_failed
from services.school_api.storefront import demo

log = get_logger(__name__)

RELAY = web.AppKey("outbox_relay", OutboxRelay)
# How long shutdown waits for the relay to finish its batch before cancelling it (a cancelled
# batch rolls back; its events go out with the next relay to run).
RELAY_STOP_TIMEOUT = 10.0


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as the JSON shapes of responses.py, including aiohttp's own 404/405."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except store.ReferenceNotFound as exc:
        return validation_failed({exc.field: "not_found"}).response()
    except store.Duplicate as exc:
        return conflict({exc.field: "already_exists"}).response()
    except store.StillReferenced:
        return conflict({"_": "still_referenced"}).response()
    except web.HTTPNotFound:
        return json({"error": "not_found"}, status=404)
    except web.HTTPMethodNotAllowed as exc:
        return json(
            {"error": "method_not_allowed"},
            status=405,
            headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
        )
    except web.HTTPRequestEntityTooLarge:
        return json({"error": "payload_too_large"}, status=413)


def create_app(settings: Settings, *, relay: bool = True, sweep: bool = True) -> web.Application:
    """The service; `relay=False` leaves publishing to other processes (and to tests),
    `sweep=False` the sweep of expired uploads."""
    # At start, naming the variable: no STORAGE_URL in production.
    open_store(settings)
    app = base_application(
        "school-api",
        middlewares=[api_errors, identity.authenticate(settings.internal_token)],
        access_log=settings.observability.access_log,
    )
    app.cleanup_ctx.append(_resources(settings, relay, sweep))
    routes.setup(app)
    storage_edge.setup(app)
    return app


def _resources(
    settings: Settings, run_relay: bool, run_sweep: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await store.create_pool(settings=settings)
        watch_pool(app[METRICS], "main", pool)
        redis_client = streams.connect(settings.redis_url)
        objects = open_store(settings)
        app[CONTEXT] = SchoolApiContext(
            settings=settings, pool=pool, redis=redis_client, objects=objects
        )

        async def postgres_ready() -> bool:
            return await db.ping(pool)

        async def redis_ready() -> bool:
            try:
                return bool(await redis_client.ping())
            except Exception:  # any failure to answer is "not ready", not a 500
                return False

        app[READINESS]["postgresql"] = postgres_ready
        app[READINESS]["redis"] = redis_ready

        # The relay restarts with backoff should it ever end, and /healthz and /readyz say
        # when it is dead or has been failing for a while.
        supervisor = tasks.Supervisor(asyncio.Event())
        watch_background(app, supervisor)
        if run_relay:
            relay = OutboxRelay(
                pool,
                redis_client,
                settings.stream(streams.EVENTS),
                dsn=settings.session_database_url,
                metrics=RelayMetrics(app[METRICS].registry),
                on_progress=lambda: supervisor.ran_cleanly("outbox-relay"),
            )
            app[RELAY] = relay
            supervisor.start("outbox-relay", relay.run)
        if settings.demo_activity:
            # `make dev`'s gentle storefront activity (CONNECT_DEMO_ACTIVITY).
            supervisor.start(
                "demo-activity",
                demo.loop(
                    pool,
                    settings.demo_activity,
                    supervisor.stop,
                    on_progress=lambda: supervisor.ran_cleanly("demo-activity"),
                ),
            )
        if run_sweep:
            supervisor.start(
                "upload-sweep",
                lambda: upload_sweep.run(
                    pool,
                    objects,
                    settings.upload_sweep_interval,
                    supervisor.stop,
                    lambda: supervisor.ran_cleanly("upload-sweep"),
                ),
            )
        try:
            yield
        finally:
            # cleanup_ctx unwinds after the server stopped taking requests and finished the
            # in-flight ones, so the relay's last batch sees every change they made.
            if run_relay:
                app[RELAY].stop()
            # A batch cut short past the grace rolls back; its events go out with the next
            # relay to run.
            await supervisor.close(grace=RELAY_STOP_TIMEOUT)
            await objects.close()
            await redis_client.aclose()
            await pool.close()

    return ctx

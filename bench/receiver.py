"""The webhook receiver of the webhooks scenario, in a process of its own.

Every POST to `/hook/{channel}` is counted under its channel: how many, how many distinct
`webhook-id`s (at-least-once may deliver twice), when the first and the last arrived, and the
end-to-end latency from the `sent_at` (wall clock, seconds) the bench wrote into the event's
`data` when it appended the event to `connect:events` to the moment the POST arrived here.
It answers 204 at once. The same handler takes wrk's direct POSTs (the receiver's own
capacity, the scenario's baseline).

    GET  /stats/{channel}   counts, first/last arrival (epoch seconds), latency percentiles
    GET  /ids/{channel}     deliveries per `webhook-id` (the fault suite's ledger reads it)
    POST /reset/{channel}
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson
from aiohttp import web


@dataclass
class Channel:
    count: int = 0
    ids: Counter[str] = field(default_factory=Counter)
    first_at: float = 0.0
    last_at: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)


CHANNELS = web.AppKey("channels", dict[str, Channel])


async def hook(request: web.Request) -> web.Response:
    now = time.time()
    body = await request.read()
    channel = request.app[CHANNELS].setdefault(request.match_info["channel"], Channel())
    channel.count += 1
    channel.ids[request.headers.get("webhook-id", "")] += 1
    if channel.first_at == 0.0:
        channel.first_at = now
    channel.last_at = now
    try:
        event = orjson.loads(body)
        sent_at = event["data"]["sent_at"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        sent_at = None
    if isinstance(sent_at, int | float) and sent_at > 0:
        channel.latencies_ms.append((now - sent_at) * 1000)
    return web.Response(status=204)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


async def stats(request: web.Request) -> web.Response:
    channel = request.app[CHANNELS].get(request.match_info["channel"], Channel())
    ordered = sorted(channel.latencies_ms)
    body = {
        "count": channel.count,
        "unique": len(channel.ids),
        "first_at": channel.first_at,
        "last_at": channel.last_at,
        "latency_n": len(ordered),
        "p50_ms": _percentile(ordered, 50),
        "p99_ms": _percentile(ordered, 99),
        "max_ms": ordered[-1] if ordered else None,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def ids(request: web.Request) -> web.Response:
    channel = request.app[CHANNELS].get(request.match_info["channel"], Channel())
    return web.Response(body=orjson.dumps(channel.ids), content_type="application/json")


async def reset(request: web.Request) -> web.Response:
    request.app[CHANNELS].pop(request.match_info["channel"], None)
    return web.Response(status=204)


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app() -> web.Application:
    app = web.Application()
    app[CHANNELS] = {}
    app.router.add_post("/hook/{channel}", hook)
    app.router.add_get("/stats/{channel}", stats)
    app.router.add_get("/ids/{channel}", ids)
    app.router.add_post("/reset/{channel}", reset)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()

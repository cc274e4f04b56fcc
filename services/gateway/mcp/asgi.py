"""One aiohttp request served by an ASGI application (the MCP SDK's transport is ASGI).

Small on purpose: the body is read whole (JSON-RPC messages are small and aiohttp's
client_max_size bounds them), the answer is streamed as the application sends it, and
`extra_scope` carries what the gateway verified to the application's handlers.
`before_send(status)` runs before the answer's status goes out (the gateway's durable audit
mode writes the call's record there); an answer it returns is sent instead, and the
application's own is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
BeforeSend = Callable[[int], Awaitable[web.StreamResponse | None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

# Credentials stay with the gateway: the application learns who called from `extra_scope`.
_WITHHELD = frozenset({b"authorization", b"cookie"})


def _scope(request: web.Request, extra: Mapping[str, Any]) -> dict[str, Any]:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    host = request.url.host or ""
    port = request.url.port or (443 if request.scheme == "https" else 80)
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1"),
        "query_string": request.query_string.encode("latin-1"),
        "root_path": "",
        "headers": [
            (name.lower(), value)
            for name, value in request.raw_headers
            if name.lower() not in _WITHHELD
        ],
        "client": (peer[0], peer[1]) if isinstance(peer, tuple) else None,
        "server": (host, port),
        "state": {},
        **extra,
    }


async def serve(
    app: ASGIApp,
    request: web.Request,
    extra_scope: Mapping[str, Any],
    before_send: BeforeSend | None = None,
) -> web.StreamResponse:
    body = await request.read()
    finished = asyncio.Event()
    delivered = False
    response: web.StreamResponse | None = None
    instead: web.StreamResponse | None = None
    start: Message | None = None

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        # Nothing more will come: the next message is the end of the exchange.
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal response, instead, start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            return
        if instead is not None:
            if not message.get("more_body", False):
                finished.set()
            return
        if response is None and before_send is not None:
            instead = await before_send(int(start["status"]))
            if instead is not None:
                if not message.get("more_body", False):
                    finished.set()
                return
        if response is None:
            headers: CIMultiDict[str] = CIMultiDict(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", ())
            )
            response = web.StreamResponse(status=int(start["status"]), headers=headers)
            await response.prepare(request)
        chunk = message.get("body", b"")
        if chunk:
            await response.write(chunk)
        if not message.get("more_body", False):
            await response.write_eof()
            finished.set()

    try:
        await app(_scope(request, extra_scope), receive, send)
    finally:
        finished.set()
    if instead is not None:
        return instead
    if response is None:
        # The application ended without a body message: its status (or 500) and nothing else.
        status = int(start["status"]) if start is not None else 500
        return web.Response(status=status)
    return response

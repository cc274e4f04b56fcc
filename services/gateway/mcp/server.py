"""The MCP server: the SDK's low-level Server and streamable HTTP transport, served by aiohttp.

Stateless and JSON-answering (the SDK's `stateless=True, json_response=True`): every POST is
a whole exchange, so any gateway process can answer any call, as contract 1 has it for every
service, and nothing about a client is held between calls. The SDK does the protocol
(JSON-RPC, initialize, versions, headers); the gateway does who-may-call (auth.py) before a
request reaches it and hands the verified Caller over in the ASGI scope (asgi.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pydantic_core
from aiohttp import web
from mcp import types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from libs.common.errors import bearer_error, json_response
from services.gateway import refusals
from services.gateway.context import context
from services.gateway.forwarded import host_of
from services.gateway.mcp import asgi, auth, metadata, tools

CALLER_KEY = "loopwise.mcp.caller"

INSTRUCTIONS = (
    "Tools act on the one school the user chose when granting this app access. Each tool's "
    "description names the scope it needs; calling one the grant lacks answers HTTP 403 "
    "insufficient_scope naming that scope, for the client to ask the user for it."
)


def _caller(ctx: ServerRequestContext[Any, Any]) -> auth.Caller:
    request = ctx.request
    caller = request.scope.get(CALLER_KEY) if request is not None else None
    if not isinstance(caller, auth.Caller):
        # Every request reaches the SDK through Endpoint.handle, which sets it.
        raise RuntimeError("an MCP request without a verified caller")
    return caller


async def _list_tools(
    ctx: ServerRequestContext[Any, Any], _params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    _caller(ctx)
    return types.ListToolsResult(tools=tools.listed())


async def _call_tool(
    ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    return await tools.run(_caller(ctx), params.name, params.arguments or {})


def build_server(version: str) -> Server[Any]:
    return Server(
        "loopwise-connect",
        version=version,
        title="Loopwise Connect",
        instructions=INSTRUCTIONS,
        on_list_tools=_list_tools,
        on_call_tool=_call_tool,
    )


class Endpoint:
    """`/mcp` and the SDK session manager behind it, for the life of the application."""

    def __init__(self, version: str) -> None:
        self.manager = StreamableHTTPSessionManager(
            build_server(version), stateless=True, json_response=True
        )
        self._verifier: auth.McpTokenVerifier | None = None

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the manager runs in a task of its own, because its anyio
        task group must be left by the task that entered it (aiohttp may start and clean up
        from different tasks)."""
        ready = asyncio.Event()
        stop = asyncio.Event()

        async def run() -> None:
            async with self.manager.run():
                ready.set()
                await stop.wait()

        task = asyncio.create_task(run())
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            waiting.cancel()
            task.result()  # raises why the manager could not start
        try:
            yield
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ctx = context(request)
        host = host_of(request, ctx)
        if not metadata.on_platform(host, ctx.settings):
            return metadata.not_here(ctx.settings)
        if request.method != "POST":
            # Stateless: no server-initiated stream for a GET to open (the transport spec's
            # 405 for "no SSE stream here") and no session for a DELETE to end.
            return json_response(
                {"error": "method_not_allowed", "error_description": "The MCP server takes POST."},
                status=405,
                headers={"Allow": "POST"},
            )
        if self._verifier is None:
            self._verifier = auth.McpTokenVerifier(ctx)
        caller = await auth.authenticate(
            request, ctx, self._verifier, host, challenge_scope=tools.STARTING_SCOPE
        )
        response: web.StreamResponse
        if isinstance(caller, web.StreamResponse):
            response = caller
        else:
            try:
                response = await self._serve(request, caller)
            finally:
                # A call that ended in an exception before its record was written (the
                # request's body unreadable) gives its place back.
                caller.slot.release()
        ctx.metrics.call(metadata.PATH, response.status)
        return response

    async def _serve(self, request: web.Request, caller: auth.Caller) -> web.StreamResponse:
        refusal = await _step_up(request, caller)
        if refusal is not None:
            return refusal
        # The protected call itself, whatever it asked (initialize and tools/list reach no
        # school API, so nothing else would record them); a tool's school API calls add their
        # own records. Recorded however it ends: its tools may have acted. 500 is what aiohttp
        # answers for a handler that raised; a call cancelled midway had no answer (499).
        status = 500

        async def before_send(answered: int) -> web.StreamResponse | None:
            # Durable mode: the call's own record is on the stream before its answer's status
            # goes out (its tools' records were written before their results, schoolapi.call).
            nonlocal status
            status = answered
            if await caller.audited("POST", metadata.PATH, answered, None):
                return None
            return refusals.audit_unavailable()

        try:
            response = await asgi.serve(
                self.manager.handle_request,
                request,
                {CALLER_KEY: caller},
                before_send if caller.ctx.audit.durable else None,
            )
            status = response.status
            # An answer the application ended without a body, not yet sent: it waits for its
            # record here (durable mode), as a streamed one did in before_send.
            if (
                not response.prepared
                and caller.slot.open
                and not await caller.audited("POST", metadata.PATH, status, None)
            ):
                return refusals.audit_unavailable()
            return response
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            if caller.slot.open:
                caller.audit("POST", metadata.PATH, status, None)


async def _step_up(request: web.Request, caller: auth.Caller) -> web.Response | None:
    """A tools/call the grant has no scope for: HTTP 403 `insufficient_scope` naming the scope
    (the MCP authorization spec's scope challenge), so the client can ask the user for it and
    retry, rather than a tool error no client acts on."""
    try:
        # The SDK's own parser: one that refused what the SDK accepts (NaN, integers past 64
        # bits) would let such a call skip the step-up answer.
        message = pydantic_core.from_json(await request.read())
    except ValueError:
        return None  # the SDK answers malformed JSON-RPC itself
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    name = params.get("name") if isinstance(params, dict) else None
    tool = tools.refused(caller, name) if isinstance(name, str) else None
    if tool is None:
        return None
    caller.ctx.metrics.rejections.labels("insufficient_scope").inc()
    if not await caller.audited("POST", f"/mcp/tools/{tool.name}", 403, None):
        return refusals.audit_unavailable()
    return bearer_error(
        403,
        "insufficient_scope",
        f"{tool.name} needs the scope {' or '.join(tool.scopes)}.",
        scope=tool.scopes[0],
        resource_metadata=metadata.metadata_url(caller.ctx.settings),
    )

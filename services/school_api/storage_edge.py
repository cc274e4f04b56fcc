"""The storage edge: accepts the bytes PUT to a signed upload URL and serves stored files.

It runs in the school API's process because that is where the key signing upload URLs is
(SECRET_PEPPER; the gateway must not hold it), but it never asks the database: the URL's
signature covers the school, the upload id, the file name, the announced type and size and the
expiry, which is everything a PUT needs checked. The bytes are read as they come, refused the
moment they pass the announced size (the connection is closed: nothing more is read), and
their first bytes must be the announced raster image's magic (PNG, JPEG, GIF, WebP; SVG and
anything else that could run in a browser is never accepted). Only a complete, checked file is
handed to the object store, which writes each key once.

Files are public at their `url`, as a CDN would serve them: the upload id is an unguessable
UUID, the answer carries its own type with `nosniff`, a sandboxing CSP, and is cacheable for
ever because a stored object is never rewritten.
"""

from __future__ import annotations

import tempfile
import time
from urllib.parse import quote
from uuid import UUID

from aiohttp import web

from libs.common.logging import get_logger
from libs.common.web import answer_and_close
from services.school_api import uploads
from services.school_api.context import context
from services.school_api.objectstore import CHUNK
from services.school_api.responses import json

log = get_logger(__name__)

# Files past this size are spooled to a temporary file instead of memory while checked.
SPOOL_IN_MEMORY = 1024 * 1024
# What a cache may do with a stored file: it never changes (objects are written once).
IMMUTABLE = "public, max-age=31536000, immutable"
# Defence in depth should a browser ever render a file as a document: no script, no fetch.
FILE_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
_SNIFF_BYTES = 12


def sniff(head: bytes) -> str | None:
    """The raster image type `head` (a file's first bytes) starts as; None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(head) >= 12 and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    return None


async def _refuse_and_close(
    request: web.Request, status: int, error: str, description: str
) -> web.StreamResponse:
    response = json({"error": error, "error_description": description}, status=status)
    return await answer_and_close(request, response)


async def put_upload(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    info = request.match_info
    try:
        grant = uploads.check(
            ctx.settings,
            request.path,
            info["school"],
            info["upload"],
            info["name"],
            dict(request.query),
            time.time(),
        )
    except uploads.Refused as refused:
        log.info("upload_refused", reason=refused.error)
        # Not a byte of the body is read for a URL that allows nothing.
        return await answer_and_close(request, json({"error": refused.error}, status=403))

    if await ctx.objects.exists(grant.key):
        # Written once; the store's own create-once check settles a race of two PUTs below.
        return await _refuse_and_close(
            request, 409, "already_stored", "These bytes were PUT already."
        )
    declared = request.content_length
    if declared is not None and declared > grant.size:
        return await _refuse_and_close(
            request, 413, "payload_too_large", f"The upload was announced as {grant.size} bytes."
        )
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        received = 0
        head = b""
        async for chunk in request.content.iter_chunked(CHUNK):
            received += len(chunk)
            if received > grant.size:
                return await _refuse_and_close(
                    request,
                    413,
                    "payload_too_large",
                    f"The upload was announced as {grant.size} bytes.",
                )
            if len(head) < _SNIFF_BYTES:
                head += chunk[: _SNIFF_BYTES - len(head)]
                if len(head) >= _SNIFF_BYTES or received == grant.size:
                    found = sniff(head)
                    if found != grant.content_type:
                        return await _refuse_and_close(
                            request,
                            415,
                            "unsupported_media_type",
                            f"The bytes are not {grant.content_type}.",
                        )
            spool.write(chunk)  # memory, or a local temporary file past SPOOL_IN_MEMORY
        if received != grant.size:
            return json(
                {
                    "error": "size_mismatch",
                    "error_description": f"Received {received} bytes, announced {grant.size}.",
                },
                status=400,
            )
        spool.seek(0)
        stored = await ctx.objects.put(
            grant.key, spool, size=grant.size, content_type=grant.content_type, name=grant.name
        )
    if not stored:
        return json(
            {"error": "already_stored", "error_description": "These bytes were PUT already."},
            status=409,
        )
    name = quote(grant.name, safe="")
    location = f"{ctx.settings.urls.platform_url}{uploads.FILES_PATH}/{grant.key}/{name}"
    return web.Response(status=201, headers={"Location": location})


async def get_file(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    info = request.match_info
    try:
        key = uploads.object_key(int(info["school"]), UUID(info["upload"]))
    except ValueError:
        return json({"error": "not_found"}, status=404)
    found = await ctx.objects.get(key)
    if found is None:
        return json({"error": "not_found"}, status=404)
    if found.name != info["name"]:
        await found.chunks.aclose()
        return json({"error": "not_found"}, status=404)
    response = web.StreamResponse(
        headers={
            "Content-Type": found.content_type,
            "Content-Length": str(found.size),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": IMMUTABLE,
            "Content-Security-Policy": FILE_CSP,
            "Cross-Origin-Resource-Policy": "cross-origin",
            # The key never changes its bytes: the key is a strong validator.
            "ETag": f'"{info["upload"]}"',
        }
    )
    if request.headers.get("If-None-Match") == response.headers["ETag"]:
        await found.chunks.aclose()
        return web.Response(
            status=304, headers={"ETag": response.headers["ETag"], "Cache-Control": IMMUTABLE}
        )
    await response.prepare(request)
    if request.method != "HEAD":
        async for chunk in found.chunks:
            await response.write(chunk)
    else:
        await found.chunks.aclose()
    await response.write_eof()
    return response


def setup(app: web.Application) -> None:
    pattern = "/{school:[0-9]{1,20}}/{upload:[0-9a-f-]{36}}/{name}"
    app.router.add_put(uploads.UPLOADS_PATH + pattern, put_upload)
    app.router.add_get(uploads.FILES_PATH + pattern, get_file)

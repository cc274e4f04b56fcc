"""A new or rotated client secret, shown once across the post-redirect-get.

It waits in Redis for a few minutes, sealed with AES-GCM under a key derived from the admin's
session cookie (which the server never stores), and is deleted by the first page load that
shows it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.identity import sessions
from services.identity.context import context

_FLASH_KEY = "connect:flash:"
_FLASH_TTL = 300
_FLASH_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def _flash_cipher(request: web.Request, flash_id: str) -> AESGCM | None:
    cookie = request.cookies.get(sessions.SESSION_COOKIE, "")
    if not cookie:
        return None
    key = hmac.new(cookie.encode(), f"lc-admin-flash\x00{flash_id}".encode(), hashlib.sha256)
    return AESGCM(key.digest())


async def stash_secret(request: web.Request, client_id: str, secret: str) -> str | None:
    """Seal the secret for the next page load; the id to name it by, None without a cookie."""
    ctx = context(request)
    flash_id = secrets.token_urlsafe(18)
    cipher = _flash_cipher(request, flash_id)
    if cipher is None:
        return None
    nonce = secrets.token_bytes(12)
    sealed = nonce + cipher.encrypt(nonce, secret.encode(), client_id.encode())
    await ctx.redis.set(ctx.settings.stream(_FLASH_KEY + flash_id), sealed, ex=_FLASH_TTL)
    return flash_id


async def take_secret(request: web.Request, client_id: str, flash_id: str) -> str | None:
    """The sealed secret, deleted as it is read: a reload, or anyone else, finds nothing."""
    if not _FLASH_ID.match(flash_id):
        return None
    ctx = context(request)
    sealed = await ctx.redis.getdel(ctx.settings.stream(_FLASH_KEY + flash_id))
    cipher = _flash_cipher(request, flash_id)
    if not isinstance(sealed, bytes) or cipher is None or len(sealed) < 13:
        return None
    try:
        return cipher.decrypt(sealed[:12], sealed[12:], client_id.encode()).decode()
    except InvalidTag:
        return None

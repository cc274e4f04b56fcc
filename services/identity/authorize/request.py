"""The authorization request once validated, and where it waits between the flow's pages.

Between pages the request lives in Redis under an unguessable id with a short TTL; the pages'
forms carry only that id and a CSRF token, never the request itself, so nothing the browser
sends back can widen what was asked. Only the browser it was first shown in may go on with it.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from libs.common.config import Settings
from services.identity import sessions
from services.identity.context import IdentityContext, context, issuer

# How long a user has for each step of the flow, and for the flow as a whole.
PENDING_TTL = 10 * 60
PENDING_MAX_AGE = 30 * 60
_PENDING_KEY = "connect:authz:"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


@dataclass(slots=True)
class AuthorizationRequest:
    """A validated authorization request, and how far its flow has come."""

    id: str
    issuer: str
    client_id: str
    client_name: str
    redirect_uri: str
    scopes: list[str]
    code_challenge: str
    state: str | None = None
    nonce: str | None = None
    resource: str | None = None
    prompt: list[str] = field(default_factory=list)
    max_age: int | None = None
    login_hint: str | None = None
    created_at: float = field(default_factory=time.time)
    # The session a sign-in during this flow created: it satisfies prompt=login and max_age.
    login_session: str | None = None
    # The school a platform client's user picked.
    school_id: int | None = None
    school_name: str | None = None
    # The scopes the consent page offered: the Allow grants no more, even if the user's role
    # was raised in between.
    offered: list[str] | None = None
    # The user has acted on one of this flow's pages (signed in, picked a school): from then on
    # an unreviewed client's errors may go back to it, as they no longer come unasked.
    interacted: bool = False
    # The browser the request was first shown in (sessions.browser_mark of its pre-session
    # cookie). Only that browser may go on with it: the request id travels in URLs, and a
    # stranger who learned it could otherwise sign in as themselves and have a code for their
    # own account issued to the client's state, nonce and PKCE challenge (code injection).
    browser: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> AuthorizationRequest:
        data = orjson.loads(raw)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _pending_key(settings: Settings, request_id: str) -> str:
    return settings.stream(_PENDING_KEY + request_id)


async def save_pending(ctx: IdentityContext, authz: AuthorizationRequest) -> None:
    await ctx.redis.set(_pending_key(ctx.settings, authz.id), authz.to_json(), ex=PENDING_TTL)


async def load_pending(request: web.Request, request_id: str) -> AuthorizationRequest | None:
    """The pending request, if it exists, is young enough, belongs to this issuer, and was
    started in this browser."""
    if not _REQUEST_ID.match(request_id):
        return None
    ctx, iss = context(request), issuer(request)
    raw = await ctx.redis.get(_pending_key(ctx.settings, request_id))
    if raw is None:
        return None
    authz = AuthorizationRequest.from_json(raw)
    if authz.issuer != iss.issuer or time.time() - authz.created_at > PENDING_MAX_AGE:
        return None
    if authz.browser is None or not sessions.is_browser(request, authz.browser):
        return None
    return authz


async def save_shown(request: web.Request, authz: AuthorizationRequest) -> str:
    """Store the request a page is about to show, bound to this browser on its first showing.
    Returns the browser's pre-session value: the page sets its cookie anew, so that it
    outlives the request."""
    ctx = context(request)
    value, _ = sessions.presession(request)
    if authz.browser is None:
        authz.browser = sessions.browser_mark(ctx.settings, value)
    await save_pending(ctx, authz)
    return value


async def consume_pending(ctx: IdentityContext, request_id: str) -> bool:
    """Take the request out of Redis; only one of two racing submissions gets True."""
    return await ctx.redis.getdel(_pending_key(ctx.settings, request_id)) is not None

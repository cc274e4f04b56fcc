"""Browser sessions: the `lc_session` cookie, CSRF tokens, sign-in and its throttling.

A session cookie holds a 256-bit random value; PostgreSQL keeps only its SHA-256, so a leaked
sessions table signs nobody in. Each session has its own CSRF secret; forms of a signed-in
user carry an HMAC of it over the form's purpose and the pending request it acts on. The
login form has no session yet, so its token is an HMAC under SECRET_PEPPER of a pre-session
cookie (double submit, but signed: an attacker who can plant a cookie still cannot mint the
matching token).

Failed sign-ins are counted per account and per caller. A per-account limit alone would let
anyone keep any account locked with a few wrong passwords, so a browser that has signed in to
an account before carries a device cookie for it (OWASP's "device cookies"): its attempts at
that account are counted against the cookie instead of the account, and strangers (no cookie,
another account's, a forged or expired one) stay throttled.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit
from uuid import UUID

from aiohttp import web
from redis.exceptions import RedisError

from libs.common import keys
from libs.common.config import Settings
from libs.common.logging import get_logger
from services.identity import audit, credentials, pages, ratelimit, store, users
from services.identity.context import IdentityContext, context, issuer
from services.identity.schools import Issuer
from services.identity.store import authorize as flow_store
from services.identity.store.authorize import Session

log = get_logger(__name__)

SESSION_COOKIE = "lc_session"
PRESESSION_COOKIE = "lc_presession"
SESSION_LIFETIME = 12 * 60 * 60
PRESESSION_LIFETIME = 60 * 60

# Failed sign-ins tolerated per account and per client address within THROTTLE_WINDOW.
# The address limit is higher: a whole school behind one NAT address shares it.
ACCOUNT_FAILURE_LIMIT = 5
ADDRESS_FAILURE_LIMIT = 20
# Per device cookie, in place of the account's: a stolen cookie guesses no faster than a
# stranger does.
DEVICE_FAILURE_LIMIT = ACCOUNT_FAILURE_LIMIT
THROTTLE_WINDOW = 15 * 60

DEVICE_COOKIE = "lc_device"
DEVICE_LIFETIME = 180 * 24 * 60 * 60
# Accounts one browser is remembered for, the latest first: a classroom computer signs in
# many, and the cookie must stay small.
DEVICE_ACCOUNTS = 5
_DEVICE_COOKIE_MAX = 1024

_USER_AGENT_MAX = 300
MAX_PASSWORD_LENGTH = 1024
MAX_EMAIL_LENGTH = 320


# Cookies ---------------------------------------------------------------------------------


def cookie_secure(settings: Settings, iss: Issuer) -> bool:
    return not settings.is_development or urlsplit(iss.issuer).scheme == "https"


def _set_cookie(
    response: web.StreamResponse, name: str, value: str, *, secure: bool, max_age: int
) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=secure, httponly=True, samesite="Lax"
    )


def set_session_cookie(response: web.StreamResponse, request: web.Request, value: str) -> None:
    secure = cookie_secure(context(request).settings, issuer(request))
    _set_cookie(response, SESSION_COOKIE, value, secure=secure, max_age=SESSION_LIFETIME)


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(SESSION_COOKIE, path="/")


def session_hash(request: web.Request) -> bytes | None:
    """The lookup key of the request's session cookie; None without a plausible cookie."""
    value = request.cookies.get(SESSION_COOKIE, "")
    if not value.startswith(credentials.SESSION_PREFIX) or len(value) > 100:
        return None
    return credentials.token_hash(value)


async def current_session(request: web.Request) -> Session | None:
    """The live session the request's cookie names, if any."""
    id_hash = session_hash(request)
    if id_hash is None:
        return None
    return await flow_store.session_by_hash(context(request).pool, id_hash)


def presession(request: web.Request) -> tuple[str, bool]:
    """The pre-session cookie value, and whether it has to be set on the response."""
    value = request.cookies.get(PRESESSION_COOKIE, "")
    if (
        32 <= len(value) <= 64
        and value.isascii()
        and value.replace("-", "").replace("_", "").isalnum()
    ):
        return value, False
    return secrets.token_urlsafe(32), True


def set_presession_cookie(response: web.StreamResponse, request: web.Request, value: str) -> None:
    secure = cookie_secure(context(request).settings, issuer(request))
    _set_cookie(response, PRESESSION_COOKIE, value, secure=secure, max_age=PRESESSION_LIFETIME)


def browser_mark(settings: Settings, presession_value: str) -> str:
    """What a pending authorization request keeps of the browser that started it."""
    return _mac(settings.secret_pepper, "authorize-browser", presession_value)


def is_browser(request: web.Request, mark: str) -> bool:
    value = request.cookies.get(PRESESSION_COOKIE, "")
    return bool(value) and _any_same(context(request).settings, mark, "authorize-browser", value)


# Device cookies ---------------------------------------------------------------------------
# `lc_device` holds up to DEVICE_ACCOUNTS entries `tag.nonce.issued.mac`, joined by `~`: the
# tag names the account (a MAC of its id, so the cookie does not say whose it is), the nonce
# tells one browser's cookie from another's, and the MAC under SECRET_PEPPER covers the three.


@dataclass(frozen=True, slots=True)
class Device:
    """One valid entry of a device cookie."""

    tag: str
    nonce: str
    issued: int

    @property
    def entry(self) -> str:
        return f"{self.tag}.{self.nonce}.{self.issued}"


_DEVICE_ENTRY = re.compile(
    r"(?P<tag>[A-Za-z0-9_-]{22})\.(?P<nonce>[A-Za-z0-9_-]{22})"
    r"\.(?P<issued>[0-9]{1,12})\.(?P<mac>[A-Za-z0-9_-]{43})"
)


def device_tag(settings: Settings, user_id: UUID) -> str:
    return _mac(settings.secret_pepper, "device-account", str(user_id))[:22]


def _is_device_tag(settings: Settings, user_id: UUID, tag: str) -> bool:
    """Whether `tag` names the account under SECRET_PEPPER or, in a rotation's overlap,
    SECRET_PEPPER_PREVIOUS (a cookie from before it began)."""
    return any(
        _same_token(_mac(pepper, "device-account", str(user_id))[:22], tag)
        for pepper in settings.secret_peppers
    )


def _device_mac(settings: Settings, tag: str, nonce: str, issued: int) -> str:
    return _mac(settings.secret_pepper, "device-cookie", tag, nonce, str(issued))


def devices(settings: Settings, value: str | None, now: float | None = None) -> list[Device]:
    """The entries of a device cookie whose MAC holds and that have not expired."""
    if not value or len(value) > _DEVICE_COOKIE_MAX:
        return []
    now = time.time() if now is None else now
    found: list[Device] = []
    for entry in value.split("~")[:DEVICE_ACCOUNTS]:
        match = _DEVICE_ENTRY.fullmatch(entry)
        if match is None:
            continue
        tag, nonce, mac, issued = match["tag"], match["nonce"], match["mac"], int(match["issued"])
        # A minute ahead for clocks of other identity processes.
        if not now - DEVICE_LIFETIME < issued <= now + 60:
            continue
        if _any_same(settings, mac, "device-cookie", tag, nonce, str(issued)):
            found.append(Device(tag, nonce, issued))
    return found


def remember_device(settings: Settings, user_id: UUID, known: Sequence[Device]) -> str:
    """The device cookie after `user_id` signed in: a fresh entry for that account first,
    then the browser's other accounts (their MACs made again under SECRET_PEPPER)."""
    fresh = Device(device_tag(settings, user_id), secrets.token_urlsafe(16), int(time.time()))
    others = (d for d in known if not _is_device_tag(settings, user_id, d.tag))
    return encode_devices(settings, [fresh, *others])


def encode_devices(settings: Settings, entries: Sequence[Device]) -> str:
    """The cookie value of up to DEVICE_ACCOUNTS entries, each with its MAC."""
    return "~".join(
        f"{d.entry}.{_device_mac(settings, d.tag, d.nonce, d.issued)}"
        for d in entries[:DEVICE_ACCOUNTS]
    )


def device_cookie(request: web.Request) -> str | None:
    return request.cookies.get(DEVICE_COOKIE)


def set_device_cookie(
    response: web.StreamResponse, request: web.Request, value: str | None
) -> None:
    """Set the cookie a successful sign-in returned (nothing when it returned none)."""
    if value:
        secure = cookie_secure(context(request).settings, issuer(request))
        _set_cookie(response, DEVICE_COOKIE, value, secure=secure, max_age=DEVICE_LIFETIME)


# CSRF ------------------------------------------------------------------------------------


def _mac(key: bytes, *parts: str) -> str:
    digest = hmac.new(key, "\x00".join(parts).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _any_same(settings: Settings, given: str, *parts: str) -> bool:
    """Whether `given` is the MAC of `parts` under SECRET_PEPPER or, during a rotation's
    overlap, SECRET_PEPPER_PREVIOUS: what was made before the rotation began still holds."""
    return any(_same_token(_mac(pepper, *parts), given) for pepper in settings.secret_peppers)


def _same_token(expected: str, given: str) -> bool:
    # compare_digest refuses str with non-ASCII characters (TypeError, so a 500), and a form
    # field can hold anything; as bytes any text compares, and none but the MAC matches.
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass"))


def login_csrf_token(settings: Settings, presession_value: str, request_id: str) -> str:
    return _mac(settings.secret_pepper, "login-csrf", presession_value, request_id)


def check_login_csrf(request: web.Request, token: str, request_id: str) -> bool:
    value = request.cookies.get(PRESESSION_COOKIE, "")
    if not value or not token:
        return False
    return _any_same(context(request).settings, token, "login-csrf", value, request_id)


def session_csrf_token(session: Session, purpose: str, request_id: str) -> str:
    return _mac(session.csrf_secret, purpose, request_id)


def check_session_csrf(session: Session, purpose: str, request_id: str, token: str) -> bool:
    if not token:
        return False
    return _same_token(session_csrf_token(session, purpose, request_id), token)


# Client address --------------------------------------------------------------------------


def _ip(value: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address((value or "").strip())) if value else None
    except ValueError:
        return None


def client_address(request: web.Request) -> str | None:
    """The caller's IP address, or None. Behind the gateway (a trusted proxy) it is the last
    hop the gateway appended to X-Forwarded-For; anything further left the caller wrote."""
    if context(request).settings.trust_forwarded_host:
        hops = request.headers.get("X-Forwarded-For", "").split(",")
        forwarded = _ip(hops[-1])
        if forwarded:
            return forwarded
    return _ip(request.remote)


# Throttling ------------------------------------------------------------------------------


# Reserve one attempt on both counters at once, or neither: a counter at its limit refuses
# (with the longest wait of those at their limit) and nothing is counted. Checking and counting
# in one script is what keeps concurrent attempts from all passing a check made before any of
# them counted. A new counter gets the window as its expiry in the same step, so none lives on.
_RESERVE = """
local waits = 0
for i = 1, #KEYS do
  local count = tonumber(redis.call('GET', KEYS[i]) or '0')
  if count >= tonumber(ARGV[i + 1]) then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then
      redis.call('PEXPIRE', KEYS[i], ARGV[1])
      ttl = tonumber(ARGV[1])
    end
    if ttl > waits then waits = ttl end
  end
end
if waits > 0 then return waits end
for i = 1, #KEYS do
  if redis.call('INCR', KEYS[i]) == 1 then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
end
return 0
"""

# Give back a reservation: only a counter still there (an expired window has nothing to give
# back) and never below zero; DECR keeps the key's expiry.
_REFUND = """
for i = 1, #KEYS do
  local count = tonumber(redis.call('GET', KEYS[i]) or '0')
  if count > 0 then redis.call('DECR', KEYS[i]) end
end
return 0
"""


def address_throttle_key(settings: Settings, address: str | None) -> str:
    """The sign-in counter of a client address (all the throttle's keys share the `{login}`
    slot: the reserve script counts on two at once)."""
    # Per IPv6 /64, as registration counts: one subscriber rotates through a whole /64.
    bucket = ratelimit.address_bucket(address) if address else "unknown"
    return keys.login_throttle(settings, "address", bucket)


class LoginThrottle:
    """Fixed-window attempt counters in Redis, per account and per client address.

    Every attempt reserves a slot on both counters before its password is checked; a failure
    keeps it (it is the failure's count), a success gives the address's back and clears the
    account's. So however many attempts arrive together, at most the limit of them reach
    argon2 within a window.

    An attempt with a device cookie for the account counts on the cookie's counter in place of
    the account's: the account's owner signs in while strangers are locked out. Its success
    clears the cookie's counter only, so the owner signing in does not hand strangers a fresh
    allowance.
    """

    def __init__(self, ctx: IdentityContext) -> None:
        self._redis = ctx.redis
        self._settings = ctx.settings

    def _account_key(self, email: str) -> str:
        # Keyed so Redis never holds readable email addresses.
        digest = credentials.keyed_hash(self._settings.secret_pepper, email.strip().lower())
        return keys.login_throttle(self._settings, "account", digest.hex()[:40])

    def _first_key(self, email: str, device: Device | None) -> tuple[str, int]:
        """The counter an attempt at this account counts on, and its limit."""
        if device is None:
            return self._account_key(email), ACCOUNT_FAILURE_LIMIT
        digest = hashlib.sha256(device.nonce.encode()).hexdigest()[:40]
        return keys.login_throttle(self._settings, "device", digest), DEVICE_FAILURE_LIMIT

    def _address_key(self, address: str | None) -> str:
        return address_throttle_key(self._settings, address)

    async def reserve(
        self, email: str, address: str | None, device: Device | None = None
    ) -> int | None:
        """Take one attempt; None when taken, else the seconds until one may be."""
        first, limit = self._first_key(email, device)
        keys = [first, self._address_key(address)]
        try:
            script = self._redis.register_script(_RESERVE)
            wait_ms = int(
                await script(keys=keys, args=[THROTTLE_WINDOW * 1000, limit, ADDRESS_FAILURE_LIMIT])
            )
        except RedisError:
            # Failing open keeps sign-in working through a Redis outage; argon2 still makes
            # each guess expensive.
            log.warning("login_throttle_unavailable")
            return None
        return None if wait_ms <= 0 else max(1, -(-wait_ms // 1000))

    async def succeeded(
        self, email: str, address: str | None, device: Device | None = None
    ) -> None:
        """The right password: the account (or the device cookie it came with) starts afresh,
        the address gets its slot back (a school behind one NAT address signing in is no
        attack on it)."""
        try:
            script = self._redis.register_script(_REFUND)
            await script(keys=[self._address_key(address)])
            await self._redis.delete(self._first_key(email, device)[0])
        except RedisError:
            log.warning("login_throttle_unavailable")

    async def release(self, email: str, address: str | None, device: Device | None = None) -> None:
        """Give both slots back: the attempt ended before its password could be judged (a
        database error), and an outage must not lock accounts out."""
        try:
            script = self._redis.register_script(_REFUND)
            await script(keys=[self._first_key(email, device)[0], self._address_key(address)])
        except RedisError:
            log.warning("login_throttle_unavailable")


# Signing in ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignIn:
    outcome: Literal["ok", "invalid", "throttled", "not_member"]
    user: store.User | None = None
    session: Session | None = None
    # The new cookie value: set it on the response and forget it.
    cookie_value: str | None = None
    retry_after: int | None = None
    # The device cookie to set with the session's (set_device_cookie).
    device_cookie: str | None = None


async def sign_in(
    ctx: IdentityContext,
    *,
    email: str,
    password: str,
    school: store.School | None,
    address: str | None,
    user_agent: str | None,
    previous_session: bytes | None,
    device_cookie: str | None = None,
) -> SignIn:
    """Check the credentials (unless throttled) and open a fresh session.

    At a school origin only the school's members and platform admins may sign in; on the
    platform origin anyone with an account may. `device_cookie` is the request's
    `lc_device`: with an entry for this account, the attempt counts against it rather than
    the account.
    """
    throttle = LoginThrottle(ctx)
    school_id = school.id if school else None

    def audit_record(action: str, subject: str | None = None, **detail: Any) -> dict[str, Any]:
        return audit.record(action, school_id=school_id, subject=subject, ip=address, **detail)

    known = devices(ctx.settings, device_cookie)
    device = await _device_for(ctx, known, email) if known else None
    retry = await throttle.reserve(email, address, device)
    if retry is not None:
        ctx.metrics.sign_in_failures.labels("throttled").inc()
        await ctx.audit.write(audit_record("login.failed", reason="throttled"))
        return SignIn("throttled", retry_after=retry)

    # Absurd lengths are refused unhashed: no one's password is this long, and argon2 should
    # not be made to chew on megabytes.
    user = None
    if len(password) <= MAX_PASSWORD_LENGTH and len(email) <= MAX_EMAIL_LENGTH:
        try:
            user = await users.authenticate(ctx.pool, email, password, gate=ctx.passwords)
        except Exception:
            # Not on cancellation: a caller who hangs up mid-check keeps its count.
            await throttle.release(email, address, device)
            raise
    if user is None:
        # The reservation stays: it is this failure's count.
        ctx.metrics.sign_in_failures.labels("bad_credentials").inc()
        await ctx.audit.write(audit_record("login.failed", reason="bad_credentials"))
        return SignIn("invalid")
    await throttle.succeeded(email, address, device)

    if school is not None and not await flow_store.may_use_school(ctx.pool, user.id, school.id):
        ctx.metrics.sign_in_failures.labels("not_member").inc()
        entry = audit_record("login.failed", str(user.id), reason="not_member")
        await ctx.audit.write(entry)
        return SignIn("not_member", user=user)

    # A new id on every sign-in: a session id planted before login (fixation) is worthless.
    # The session and its login.succeeded record commit together. A failed sign-in stores
    # nothing in PostgreSQL (its count is in Redis): its record is written alone, before the
    # answer.
    cookie_value = credentials.new_secret(credentials.SESSION_PREFIX)
    async with ctx.pool.acquire() as conn, conn.transaction():
        if previous_session is not None:
            await flow_store.delete_session(conn, previous_session)
        session = await flow_store.insert_session(
            conn,
            id_hash=credentials.token_hash(cookie_value),
            user_id=user.id,
            csrf_secret=secrets.token_bytes(32),
            lifetime_seconds=SESSION_LIFETIME,
            user_agent=(user_agent or "")[:_USER_AGENT_MAX] or None,
        )
        await audit.write(conn, audit_record("login.succeeded", str(user.id)))
    return SignIn(
        "ok",
        user=user,
        session=session,
        cookie_value=cookie_value,
        device_cookie=remember_device(ctx.settings, user.id, known),
    )


async def _device_for(ctx: IdentityContext, known: Sequence[Device], email: str) -> Device | None:
    """The entry of the device cookie for the account `email` names, if it has one. Read only
    when the cookie holds a valid entry, so strangers' attempts cost no extra query."""
    if len(email) > MAX_EMAIL_LENGTH:
        return None
    user = await store.user_by_email(ctx.pool, email.strip())
    if user is None:
        return None
    return next((d for d in known if _is_device_tag(ctx.settings, user.id, d.tag)), None)


async def sign_out(ctx: IdentityContext, id_hash: bytes | None) -> None:
    if id_hash is not None:
        await flow_store.delete_session(ctx.pool, id_hash)


# Sign-out route --------------------------------------------------------------------------

LOGOUT_PURPOSE = "logout"


def logout_csrf_token(session: Session) -> str:
    return session_csrf_token(session, LOGOUT_PURPOSE, "")


def safe_return_path(value: str) -> str:
    """Only a path on this origin: never `//host` or a scheme, which would be an open redirect."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        parts = urlsplit(value)
        if not parts.scheme and not parts.netloc:
            return value
    return "/v1/oauth/signed-out"


def see_other(location: str) -> web.Response:
    """A 303: after a form post the browser follows with a GET, and never re-posts."""
    return web.Response(
        status=303,
        headers={
            "Location": location,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )


async def logout(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    session = await current_session(request)
    token = str(form.get("csrf_token", ""))
    if session is not None and not check_session_csrf(session, LOGOUT_PURPOSE, "", token):
        return pages.render(
            request,
            "error.html",
            status=403,
            title="Request refused",
            message="This form has expired. Go back, reload the page and try again.",
        )
    await sign_out(context(request), session.id_hash if session else None)
    response = see_other(safe_return_path(str(form.get("return_to", ""))))
    clear_session_cookie(response)
    return response


async def signed_out(request: web.Request) -> web.StreamResponse:
    return pages.render(
        request,
        "error.html",
        title="Signed out",
        tone="info",
        message="You have signed out of Loopwise Connect. You can close this window.",
    )


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/oauth/logout", logout)
    app.router.add_get("/v1/oauth/signed-out", signed_out)


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/oauth/logout": {
        "post": {
            "summary": "End the browser session (form post with the session's CSRF token)",
            "requestBody": {
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "csrf_token": {"type": "string"},
                                "return_to": {"type": "string", "description": "a local path"},
                            },
                        }
                    }
                }
            },
            "responses": {"303": {"description": "Signed out"}, "403": {"description": "CSRF"}},
        }
    },
    "/v1/oauth/signed-out": {
        "get": {"summary": "Signed-out page", "responses": {"200": {"description": "HTML"}}}
    },
}

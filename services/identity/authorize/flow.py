"""The flow after a valid request: sign in, pick a school, consent, code (RFC 6749 4.1.1-4.1.2,
OIDC Core 3.1.2.3-3.1.2.6 for prompt and max_age).

`advance` takes the flow as far as it goes without the user, in passes, each on the state as it
now is (client, session, school, role, remembered consent, read in one query). A pass answers
with a page, an error or a code, or changes what the next pass stands on (`_Again`). Its steps,
in order:

1. `_client_refused`: the client is gone, or a self-registered one's school has closed.
2. `_session_for_school`: the signed-in user may act at the school (else sign in again, or
   pick the school anew on the platform).
3. `needs_login`: no session, prompt=login, or max_age exceeded: the sign-in page.
4. `_pick_school`: a platform client's request without a school: the only one, or the picker.
5. `_grant_or_consent`: what the user's role allows; a code on remembered consent, or the
   consent page.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from libs.common.errors import (
    AccessDenied,
    ConsentRequired,
    InteractionRequired,
    LoginRequired,
    OAuthError,
    ServerError,
)
from libs.common.logging import get_logger
from services.identity import clients, consent, roles, sessions, store
from services.identity.authorize.issue import issue_code
from services.identity.authorize.pages import show_consent, show_login, show_picker
from services.identity.authorize.request import AuthorizationRequest, consume_pending
from services.identity.authorize.responses import (
    client_gone,
    code_redirect,
    error_page,
    expired,
    request_error,
)
from services.identity.authorize.school_choice import closed_to, school_choices
from services.identity.context import context, issuer
from services.identity.schools import Issuer
from services.identity.store import authorize as flow_store
from services.identity.store.authorize import AuthorizeState, Session

log = get_logger(__name__)

# When nothing of a request fits the user's role (roles.py). A request that keeps anything,
# if only `openid`, is granted narrowed instead (RFC 6749 3.3), as Keycloak and node-oidc do:
# the token response's `scope` tells the client what it got.
NEEDS_ADMIN = (
    "The access this application asks for needs a school admin; the user's role at the "
    "school does not allow any of it."
)

# The most passes the flow makes before it has an answer: the school of someone signed in
# before is dropped, the user's only school is picked, a remembered consent is withdrawn
# while its code was being made, and then a page or a code.
_MAX_PASSES = 4


@dataclass(frozen=True, slots=True)
class _Again:
    """A pass changed what the flow stands on: look again. `pending` is whether the request
    is still stored (issuing a code takes it out)."""

    pending: bool


def needs_login(authz: AuthorizationRequest, session: Session | None) -> bool:
    """No session, or OIDC Core 3.1.2.1's prompt=login or max_age asks for a fresh sign-in."""
    if session is None:
        return True
    if authz.login_session == session.id_hash.hex():
        # Signed in during this very flow: prompt=login and max_age are satisfied.
        return False
    if "login" in authz.prompt:
        return True
    if authz.max_age is not None:
        age = (datetime.now(UTC) - session.authenticated_at).total_seconds()
        return age > authz.max_age
    return False


def _still_usable(client: store.Client | None, iss: Issuer) -> bool:
    """The client the flow began with still exists, is enabled, and belongs here."""
    return (
        client is not None
        and client.disabled_at is None
        and clients.belongs_to(client, iss.school_id)
    )


def _standing(school_id: int | None, loaded: AuthorizeState) -> tuple[object, ...]:
    """What a pass decides from: a pass that starts from the same as an earlier one would
    decide the same again, so the flow is stuck rather than making progress."""
    return (
        school_id,
        loaded.session.id_hash if loaded.session else None,
        loaded.session_may_use_school,
        loaded.consented,
        loaded.role,
        loaded.platform_admin,
    )


async def advance(
    request: web.Request,
    authz: AuthorizationRequest,
    loaded: AuthorizeState | None = None,
    *,
    pending: bool,
) -> web.StreamResponse:
    """Take the flow as far as it goes without the user: a code, an error, or the next page.

    `pending` says the request came out of Redis (and must be taken out before its code is
    issued); a fresh request is stored only when a page has to be shown. A loop of passes,
    each on the state as it now is: a pass that would start where an earlier one did, or
    one too many, ends the flow with server_error instead of going round.
    """
    ctx, iss = context(request), issuer(request)
    seen: set[tuple[object, ...]] = set()
    client: store.Client | None = None
    for _ in range(_MAX_PASSES):
        school_id = iss.school_id if iss.school is not None else authz.school_id
        if loaded is None:
            loaded = await flow_store.authorize_state(
                ctx.pool,
                client_id=authz.client_id,
                session_hash=sessions.session_hash(request),
                school_id=school_id,
            )
        client = loaded.client
        standing = _standing(school_id, loaded)
        if standing in seen:
            break
        seen.add(standing)
        outcome = await _advance_once(request, authz, loaded, school_id, pending=pending)
        if not isinstance(outcome, _Again):
            return outcome
        loaded, pending = None, outcome.pending
    log.error("authorize_flow_stuck", client_id=authz.client_id, passes=len(seen))
    if not _still_usable(client, iss):
        return client_gone(request)
    assert client is not None
    stuck = ServerError("The authorization request could not be completed.")
    return request_error(
        request, client, authz.redirect_uri, authz.state, stuck, interacted=authz.interacted
    )


@dataclass(frozen=True, slots=True)
class _Pass:
    """What one pass works on."""

    request: web.Request
    authz: AuthorizationRequest
    loaded: AuthorizeState
    client: store.Client
    school_id: int | None
    pending: bool

    def fail(self, error: OAuthError) -> web.Response:
        """An error of the request, back to the client or on our page (request_error)."""
        return request_error(
            self.request,
            self.client,
            self.authz.redirect_uri,
            self.authz.state,
            error,
            interacted=self.authz.interacted,
        )


async def _advance_once(
    request: web.Request,
    authz: AuthorizationRequest,
    loaded: AuthorizeState,
    school_id: int | None,
    *,
    pending: bool,
) -> web.StreamResponse | _Again:
    """One pass of the flow: an answer, or _Again when it changed what the next pass stands on."""
    refused = await _client_refused(request, loaded.client, school_id)
    if refused is not None:
        return refused
    assert loaded.client is not None
    step = _Pass(request, authz, loaded, loaded.client, school_id, pending)
    session = _session_for_school(step)
    if isinstance(session, _Again):
        return session
    if needs_login(authz, session):
        if "none" in authz.prompt:
            return step.fail(LoginRequired("The user is not signed in."))
        return await show_login(request, authz)
    assert session is not None
    if school_id is None:
        return await _pick_school(step, session)
    return await _grant_or_consent(step, session, school_id)


async def _client_refused(
    request: web.Request, client: store.Client | None, school_id: int | None
) -> web.Response | None:
    """Our page when the client is gone, or registered itself at a school that has closed."""
    if not _still_usable(client, issuer(request)):
        return client_gone(request)
    assert client is not None
    if client.created_via == "registration" and school_id is not None:
        # Read afresh, not from the Host cache: the school may have closed a moment ago. Shown
        # here, not redirected: the app is unreviewed (RFC 9700 4.11.2).
        school = await store.school_by_id(context(request).pool, school_id)
        if school is not None and closed_to(client, school):
            return error_page(
                request, f"{school.name} does not accept applications that registered themselves."
            )
    return None


def _session_for_school(step: _Pass) -> Session | _Again | None:
    """The session, if its user may act at the school; None (sign in again) if not; _Again
    when a platform request's school was picked by whoever was signed in before."""
    session = step.loaded.session
    if session is None or step.school_id is None or step.loaded.session_may_use_school:
        return session
    if issuer(step.request).school is None:
        # The school was picked by whoever was signed in before: this user picks anew.
        step.authz.school_id = step.authz.school_name = None
        return _Again(step.pending)
    # Signed in, but as someone who may not act at this school: sign in again.
    return None


async def _pick_school(step: _Pass, session: Session) -> web.StreamResponse | _Again:
    """A platform client's request: the user's only school, or the picker."""
    authz = step.authz
    everything = await school_choices(context(step.request), authz, session.user_id, step.client)
    choices = [c for c in everything if not c.closed]
    if not everything:
        return step.fail(
            AccessDenied("The user does not belong to any school, so there is no school to grant.")
        )
    if not choices:
        return step.fail(
            AccessDenied(
                "None of the user's schools accepts applications that registered themselves."
            )
        )
    usable = [c for c in choices if c.problem is None]
    if len(choices) == 1 and usable:
        # One school: nothing to choose, and the consent screen names it anyway.
        authz.school_id = usable[0].school_id
        authz.school_name = usable[0].name
        return _Again(step.pending)
    if "none" in authz.prompt:
        return step.fail(InteractionRequired("The user has to choose a school."))
    return await show_picker(step.request, authz, session, choices)


async def _grant_or_consent(
    step: _Pass, session: Session, school_id: int
) -> web.StreamResponse | _Again:
    """What the user's role allows of the request: a code at once on remembered consent, else
    the consent page (or consent_required with prompt=none)."""
    request, authz, loaded = step.request, step.authz, step.loaded
    # Checked on every pass, remembered consent included: a role lowered since then lowers
    # what the user can grant now.
    narrowed = roles.narrow(
        authz.scopes, roles.ceiling(loaded.role, platform_admin=loaded.platform_admin)
    )
    if not narrowed.granted:
        return step.fail(AccessDenied(NEEDS_ADMIN))
    need = consent.assess(narrowed.granted, loaded.consented)
    if need.remembered and "consent" not in authz.prompt:
        if step.pending and not await consume_pending(context(request), authz.id):
            # Another tab finished this very request first: one code per request.
            return expired(request)
        granted = dataclasses.replace(authz, scopes=list(narrowed.granted))
        code = await issue_code(
            request, granted, school_id=school_id, session=session, remember_consent=False
        )
        if code is None:
            # Withdrawn since it was read: ask again (or, with prompt=none, say so).
            return _Again(pending=False)
        return code_redirect(issuer(request), authz, code)
    if "none" in authz.prompt:
        return step.fail(ConsentRequired("The user has not consented to these scopes."))
    authz.offered = list(narrowed.granted)
    return await show_consent(request, authz, session, need, withheld=narrowed.withheld)

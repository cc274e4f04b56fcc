"""SQL of the periodic sweep: batched deletes of rows nothing can use any more.

Every statement deletes at most `batch` rows: the victims are picked by a subquery with
LIMIT and `FOR UPDATE SKIP LOCKED`, then deleted by `ctid` (a TID scan, no second index
lookup). SKIP LOCKED lets sweepers in several processes run at once, each taking rows the
others have not, and never wait on a row a live request holds (a code being redeemed, a refresh
token being rotated): such a row is simply left for the next sweep.
"""

from __future__ import annotations

from libs.common.db import Executor


def _deleted(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


# Codes live 60 seconds. Replay detection (a second redemption revokes the grant) needs the
# redeemed row only while the code could still be exchanged: once expired, a replay is refused
# as expired whatever the row says, so the row has nothing left to protect.
_EXPIRED_CODES = """
DELETE FROM authorization_codes WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM authorization_codes WHERE expires_at <= now()
    LIMIT $1 FOR UPDATE SKIP LOCKED))
"""

# A session past its expiry is never read (session_by_hash and authorize_state filter on it).
_EXPIRED_SESSIONS = """
DELETE FROM sessions WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM sessions WHERE expires_at <= now()
    LIMIT $1 FOR UPDATE SKIP LOCKED))
"""

# Rotated-away tokens are what reuse detection matches, so they are kept, like live ones,
# until their own expiry: the token endpoint checks expiry before reuse, so an expired token
# is refused as expired and never ends the grant, whether its row exists or not.
_EXPIRED_REFRESH_TOKENS = """
DELETE FROM refresh_tokens WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM refresh_tokens WHERE expires_at <= now()
    LIMIT $1 FOR UPDATE SKIP LOCKED))
"""

# Once its grant is revoked a refresh token can do nothing (every endpoint checks the grant
# first, and a revocation is never undone), rotated or not, so reuse detection has nothing
# to guard. Grants revoked longer ago than the window (the shorter refresh lifetime, or 90 days
# when none is set: TokenPolicy.revoked_refresh_sweep_window) had their tokens taken by an
# earlier pass or left only expired ones: the window keeps this scan from growing with history.
_REVOKED_GRANT_REFRESH_TOKENS = """
DELETE FROM refresh_tokens WHERE ctid = ANY(ARRAY(
    SELECT rt.ctid FROM grants g JOIN refresh_tokens rt ON rt.grant_id = g.id
    WHERE g.revoked_at IS NOT NULL
      AND g.revoked_at > now() - make_interval(secs => $2)
    LIMIT $1 FOR UPDATE OF rt SKIP LOCKED))
"""


async def delete_expired_codes(db: Executor, batch: int) -> int:
    return _deleted(await db.execute(_EXPIRED_CODES, batch))


async def delete_expired_sessions(db: Executor, batch: int) -> int:
    return _deleted(await db.execute(_EXPIRED_SESSIONS, batch))


async def delete_expired_refresh_tokens(db: Executor, batch: int) -> int:
    return _deleted(await db.execute(_EXPIRED_REFRESH_TOKENS, batch))


async def delete_refresh_tokens_of_revoked_grants(
    db: Executor, batch: int, window_seconds: int
) -> int:
    return _deleted(await db.execute(_REVOKED_GRANT_REFRESH_TOKENS, batch, window_seconds))

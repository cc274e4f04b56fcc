"""The Redis key space, laid out for Redis Cluster (and still plain keys on one node).

A Cluster runs a script or a multi-key command only when all its keys hash to one slot; a key's
slot is that of its `{hash tag}` when it has one. So every key a script or multi-key command
touches together carries the same tag:

- Per school, ``{s<school id>}``: a grant's revocation mark and the gateway's rate bucket of a
  client at that school, read together by the per-call guard (services/gateway/ratelimit.py).
  A grant belongs to one school (grants.school_id), a call is for one school, and the school is
  the unit of tenancy, so the guard's one round trip stays one, and the schools, not one hot
  slot, spread the gateways' traffic over the primaries.
- Per function, where the keys of one script have nothing else in common: the sign-in
  throttle's account, device and address counters (``{login}``; sign-ins are few and argon2
  bounds them, so one slot holds them all without becoming a hot spot).
- With a stream, ``{<stream name as prefixed>}``: a key that a script reads with a stream hashes
  to the stream's own slot. The streams keep their names (contract section 11), and an untagged
  key's slot is that of its whole name, so the revocation leases hash (read with
  ``connect:revocations`` by the lease TAKE) is tagged with that name.

REDIS_KEY_PREFIX still comes first in every key, so one prefix's keys are found by one pattern.
Single keys (a client's registration bucket, a flash message) need no tag.
"""

from __future__ import annotations

from libs.common.config import Settings

# Not a stream: a revoked grant's mark is `<prefix>connect:revoked:{s<school>}:<grant id>`
# (identity writes it, gateways and webhooks read it).
REVOKED = "connect:revoked:"
GATEWAY_BUCKET = "connect:ratelimit:"
LOGIN_THROTTLE = "connect:throttle:login:{login}:"


def school_tag(school_id: int | str) -> str:
    return f"{{s{school_id}}}"


def revoked_mark(settings: Settings, school_id: int | str, grant_id: object) -> str:
    """The revocation mark of a grant of `school_id`."""
    return f"{settings.redis_prefix}{REVOKED}{school_tag(school_id)}:{grant_id}"


def revoked_pattern(settings: Settings) -> str:
    """A SCAN MATCH pattern for every revocation mark of this prefix."""
    return _glob_escape(f"{settings.redis_prefix}{REVOKED}") + "{s*}:*"


def grant_of_mark(settings: Settings, key: str) -> str | None:
    """The grant id of a mark's key; None when it is not one."""
    head = f"{settings.redis_prefix}{REVOKED}{{s"
    if not key.startswith(head):
        return None
    _, sep, grant_id = key[len(head) :].partition("}:")
    return grant_id or None if sep else None


def gateway_bucket_prefix(settings: Settings) -> str:
    return f"{settings.redis_prefix}{GATEWAY_BUCKET}"


def gateway_bucket(settings: Settings, school_id: int | str, client_id: str) -> str:
    """The rate bucket of a client at a school, in the school's slot with its grants' marks."""
    return f"{gateway_bucket_prefix(settings)}{school_tag(school_id)}:{client_id}"


def login_throttle(settings: Settings, kind: str, value: str) -> str:
    """A sign-in throttle counter: `kind` is account, device or address."""
    return f"{settings.redis_prefix}{LOGIN_THROTTLE}{kind}:{value}"


def with_stream(settings: Settings, stream: str, name: str) -> str:
    """`name`, in the slot of the stream `stream` (unprefixed, as streams.py names it)."""
    return f"{settings.redis_prefix}{name}{{{settings.redis_prefix}{stream}}}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

"""Role scope ceilings: the most a user's role at a school lets them hand an application.

Consent is only worth what the consenting user may see themselves: a student (role `member`)
allowing `students:read` would hand an app every member's personal data. So each role has a
ceiling, like Keycloak's role scope mappings, and a grant never holds a scope beyond the
ceiling of the user who made it. The authorize flow drops what is beyond it (RFC 6749 3.3 lets
the server grant less than asked); the refresh path ends a grant whose user's role has since
been lowered or whose membership is gone.

The ceilings follow seed 002's descriptions of the scopes, not what today's school API happens
to return for them: a scope is a promise about a kind of data, and fields get added.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from libs.common import scopes as catalogue

_IDENTITY = catalogue.IDENTITY_SCOPES

# What a member already sees in the school's storefront. Not `school:read` ("configuration
# and settings" is more than the public site shows), not `curriculum:read` (lessons and
# materials of courses the member has not bought), and nothing about other people: so not
# `courses:read` either, which seed 002 gives "course details, curriculum, and enrollment
# data" (every lesson and material, and who is enrolled in what).
_MEMBER = _IDENTITY | {
    "events:read",
    "posts:read",
    "comments:read",
    "lecturers:read",
    "membership_plans:read",
    "digital_products:read",
    # Not `appearance:read`: the theme is public, but the settings it is read from carry the
    # school's contact address, locale and currency as well (GET /api/v1/settings takes
    # either scope and answers them all).
}

# Staff who teach: everything a member sees, the school's configuration (time zone, locale
# and currency decide when a class is), the curriculum, and writing teaching content.
# Not `students:read`: the scope is school-wide (every member's profile and progress), and a
# token cannot say "only my courses", so a lecturer could hand out the whole roster; who is in
# their courses they already see through `courses:read` ("enrollment data").
# Not `lecturers:write` either: it edits every lecturer's profile, not just one's own.
_LECTURER = _MEMBER | {
    "courses:read",
    "school:read",
    "appearance:read",
    "curriculum:read",
    "courses:write",
    "curriculum:write",
    "posts:write",
    "events:write",
    # Posts and lessons carry images; an upload is only reachable from content they write.
    "storage:write",
}

# Everything an application may ever hold (never the admin:* scopes).
_ADMIN = frozenset(catalogue.PUBLIC_SCOPES)

CEILINGS: dict[str, frozenset[str]] = {
    "admin": _ADMIN,
    "lecturer": frozenset(_LECTURER),
    "member": frozenset(_MEMBER),
}


def ceiling(role: str | None, *, platform_admin: bool = False) -> frozenset[str]:
    """The scopes `role` may grant; nothing at all without a membership.

    A platform administrator may act at every school (they can use the admin pages of any),
    so they have the admin ceiling whatever their membership.
    """
    if platform_admin:
        return _ADMIN
    return CEILINGS.get(role or "", frozenset())


def permits(top: frozenset[str], scope: str) -> bool:
    """An umbrella counts as everything it stands for: `read` fits only if every read does."""
    expansion = catalogue.UMBRELLA_EXPANSION.get(scope)
    if expansion is not None:
        return expansion <= top
    return scope in top


@dataclass(frozen=True, slots=True)
class Narrowed:
    # What the user may grant, in the order asked.
    granted: tuple[str, ...]
    # What was asked but needs a higher role (a school admin), in the order asked.
    withheld: tuple[str, ...]


def narrow(requested: Sequence[str], top: frozenset[str]) -> Narrowed:
    granted = tuple(s for s in requested if permits(top, s))
    withheld = tuple(s for s in requested if not permits(top, s))
    return Narrowed(granted, withheld)


def exceeds(scopes: Iterable[str], top: frozenset[str]) -> bool:
    """True when any of `scopes` is beyond the ceiling (an empty grant never is)."""
    return any(not permits(top, s) for s in scopes)

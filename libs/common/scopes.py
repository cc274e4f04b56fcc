"""The scope catalogue of seed 002, word for word, and the rules every service applies to it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

ScopeKind = Literal["identity", "data", "umbrella", "admin"]


@dataclass(frozen=True, slots=True)
class Scope:
    name: str
    description: str
    kind: ScopeKind


_IDENTITY = (
    (
        "openid",
        "Required for identity access. Returns the user's unique identifier (sub claim). "
        "This is the default scope.",
    ),
    ("profile", "Access the user's name"),
    ("email", "Access the user's email address and verification status"),
)

_DATA = (
    ("courses:read", "Read course details, curriculum, and enrollment data"),
    ("courses:write", "Create, update, and delete courses"),
    ("students:read", "Read student profiles and progress data"),
    ("students:write", "Create and update student records, manage enrollments"),
    ("analytics:read", "Read analytics and reporting data"),
    ("curriculum:read", "Read curriculum structure (lessons, chapters, materials)"),
    ("curriculum:write", "Create and update curriculum content"),
    ("orders:read", "Read order and payment data"),
    ("school:read", "Read school configuration and settings"),
    ("school:write", "Update school configuration and settings"),
    ("appearance:read", "Read school appearance and theme settings"),
    ("appearance:write", "Update school appearance and theme settings"),
    ("events:read", "Read event details and attendees"),
    ("events:write", "Create, update, and delete events"),
    ("membership_plans:read", "Read membership plan details"),
    ("membership_plans:write", "Create and update membership plans"),
    ("coupons:read", "Read coupon details"),
    ("coupons:write", "Create and update coupons"),
    ("posts:read", "Read post content"),
    ("posts:write", "Create, update, and delete posts"),
    ("digital_products:read", "Read digital download details"),
    ("digital_products:write", "Create and update digital downloads"),
    ("comments:read", "Read comments"),
    ("lecturers:read", "Read lecturer profiles"),
    ("lecturers:write", "Create and update lecturer profiles"),
    ("storage:write", "Upload files and images"),
    ("subscriptions:read", "Read subscription data"),
    ("subscriptions:write", "Manage subscriptions"),
)

# The quickstart's legacy umbrella scopes: each stands for every data scope of its kind.
_UMBRELLA = (
    ("read", "Read all school data this app is allowed to read"),
    ("write", "Create, update, and delete all school data this app is allowed to change"),
)

_ADMIN = (
    ("admin:read", "Read platform administration data"),
    ("admin:write", "Change platform administration data"),
)

_GROUPS: tuple[tuple[tuple[tuple[str, str], ...], ScopeKind], ...] = (
    (_IDENTITY, "identity"),
    (_DATA, "data"),
    (_UMBRELLA, "umbrella"),
    (_ADMIN, "admin"),
)
CATALOGUE: dict[str, Scope] = {
    name: Scope(name, text, kind) for group, kind in _GROUPS for name, text in group
}

DEFAULT_SCOPE = "openid"
IDENTITY_SCOPES = frozenset(n for n, _ in _IDENTITY)
DATA_SCOPES = frozenset(n for n, _ in _DATA)
ADMIN_SCOPES = frozenset(n for n, _ in _ADMIN)
UMBRELLA_EXPANSION: dict[str, frozenset[str]] = {
    "read": frozenset(s for s in DATA_SCOPES if s.endswith(":read")),
    "write": frozenset(s for s in DATA_SCOPES if s.endswith(":write")),
}
# What third parties may ever hold: everything but the admin scopes.
PUBLIC_SCOPES = tuple(n for n, s in CATALOGUE.items() if s.kind != "admin")


def parse(scope: str | None) -> list[str]:
    """A space-delimited scope string (RFC 6749 3.3) as an ordered list without repeats."""
    if not scope:
        return []
    seen: dict[str, None] = {}
    for item in scope.split(" "):
        if item:
            seen.setdefault(item, None)
    return list(seen)


def format_scopes(scopes: Iterable[str]) -> str:
    return " ".join(dict.fromkeys(scopes))


def unknown(scopes: Iterable[str]) -> list[str]:
    return [s for s in scopes if s not in CATALOGUE]


def expand(scopes: Iterable[str]) -> frozenset[str]:
    """The effective scopes: umbrella scopes replaced by what they stand for, kept too."""
    out: set[str] = set()
    for s in scopes:
        out.add(s)
        out |= UMBRELLA_EXPANSION.get(s, frozenset())
    return frozenset(out)


def satisfies(granted: Iterable[str], any_of: Iterable[str]) -> bool:
    """True when the granted scopes (umbrellas expanded) hold at least one of `any_of`."""
    effective = expand(granted)
    return any(s in effective for s in any_of)


def describe(scopes: Iterable[str]) -> list[Scope]:
    """Catalogue entries for a consent screen, in the order asked."""
    return [CATALOGUE[s] for s in scopes if s in CATALOGUE]

"""Remembered consent: what a user already allowed a client at a school, and what is new.

A user is asked once per scope: a request wholly covered by the consents row skips the
screen; a request with new scopes shows only those, and names the ones already allowed
separately. The row only ever grows here; forgetting it is the Connected Apps page's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from libs.common import scopes as catalogue
from libs.common.db import Executor
from services.identity.store import authorize as flow_store


@dataclass(frozen=True, slots=True)
class ConsentNeed:
    # Requested scopes the user has not agreed to yet, in the order asked.
    new: tuple[str, ...]
    # Requested scopes an earlier consent already covers.
    previously: tuple[str, ...]

    @property
    def remembered(self) -> bool:
        return not self.new


def uncovered(remembered: Sequence[str] | None, requested: Sequence[str]) -> tuple[str, ...]:
    """The requested scopes a remembered consent does not cover, in the order asked.

    The one rule of what a consent covers, for the flow that decides to skip the screen and
    for the transaction that issues the code alike: were they to differ, a request one
    passed and the other refused would go round forever. An umbrella scope consented to
    (`read`) covers the data scopes it stands for; the reverse does not hold: agreeing to
    `courses:read` says nothing about `read`.
    """
    covered = catalogue.expand(remembered or ())
    return tuple(s for s in requested if s not in covered)


def covers(remembered: Sequence[str] | None, requested: Sequence[str]) -> bool:
    """Whether a remembered consent (None: there is none) covers every requested scope."""
    return not uncovered(remembered, requested)


def assess(requested: Sequence[str], consented: Sequence[str] | None) -> ConsentNeed:
    """Split the request into new and already-allowed scopes."""
    new = uncovered(consented, requested)
    previously = tuple(s for s in requested if s not in new)
    return ConsentNeed(new, previously)


@dataclass(frozen=True, slots=True)
class ScopeLine:
    name: str
    description: str


def lines(scopes: Sequence[str]) -> list[ScopeLine]:
    """Each scope in the words of seed 002, for the consent screen."""
    return [ScopeLine(s.name, s.description) for s in catalogue.describe(scopes)]


async def remember(
    db: Executor, *, user_id: UUID, client_id: str, school_id: int, scopes: Sequence[str]
) -> tuple[str, ...]:
    """Record the user's Allow: the row becomes the union of old and new scopes."""
    return await flow_store.upsert_consent(
        db, user_id=user_id, client_id=client_id, school_id=school_id, scopes=scopes
    )

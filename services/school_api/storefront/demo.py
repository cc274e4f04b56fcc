"""A gentle stream of storefront activity in the demo schools, so that a partner trying the
system under `make dev` sees events flow (CONNECT_DEMO_ACTIVITY: seconds between actions; 0,
the default outside `make dev`, turns it off; refused in production).

One action at a time, in one school at a time, chosen at random with the weights below: mostly
purchases, progress, sign-ups, comments and registrations; now and then a refund, a removal
or a cancellation. Run by the school API's supervisor, which restarts it should it fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from libs.common.logging import get_logger
from services.school_api.storefront import actions, store

log = get_logger(__name__)

# (action, options, weight)
_STEPS: tuple[tuple[str, dict[str, Any], float], ...] = (
    ("checkout", {"paid": True}, 4),
    ("checkout", {"paid": True, "coupon": "WELCOME10"}, 1),
    ("checkout", {}, 1),
    ("checkout", {"declined": True}, 1),
    ("refund", {}, 0.5),
    ("signup", {}, 2),
    ("remove-member", {}, 0.5),
    ("progress", {}, 4),
    ("unenroll", {}, 0.3),
    ("comment", {}, 2),
    ("hide-comment", {}, 0.3),
    ("delete-comment", {}, 0.3),
    ("review", {"rating": 5}, 1),
    ("edit-review", {"rating": 4}, 0.3),
    ("delete-review", {}, 0.2),
    ("register", {}, 2),
    ("cancel-registration", {}, 0.5),
    ("renew", {}, 1),
    ("cancel-subscription", {}, 0.2),
)


async def step(
    pool: asyncpg.Pool, rng: random.Random, schools: Sequence[int] | None = None
) -> store.Outcome | None:
    """One action in one of `schools` (default: every school given sample data); None when
    there is no school or nothing fits."""
    schools = schools if schools is not None else await store.demo_schools(pool)
    if not schools:
        return None
    name, options, _ = rng.choices(_STEPS, weights=[w for *_, w in _STEPS])[0]
    school_id = rng.choice(schools)
    try:
        outcome = await actions.run(pool, name, school_id, options)
    except store.StorefrontError as exc:
        # A demo school may have nothing to refund or cancel right now: the next step will.
        log.debug("demo_activity_skipped", action=name, school_id=school_id, reason=str(exc))
        return None
    log.info("demo_activity", action=name, school_id=school_id, events=outcome.events)
    return outcome


def loop(
    pool: asyncpg.Pool,
    interval: float,
    stop: asyncio.Event,
    *,
    on_progress: Callable[[], None] | None = None,
    rng: random.Random | None = None,
    schools: Sequence[int] | None = None,
) -> Callable[[], Any]:
    """The loop for the supervisor: a step every `interval` seconds (jittered) until `stop`."""
    chance = rng or random.Random()  # noqa: S311 (demo data, not security)

    async def run() -> None:
        while not stop.is_set():
            await step(pool, chance, schools)
            if on_progress is not None:
                on_progress()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval * chance.uniform(0.5, 1.5))

    return run

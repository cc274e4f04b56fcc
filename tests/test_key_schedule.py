"""Scheduled signing-key rotation: due issuers rotate once, however many processes check."""

from __future__ import annotations

import asyncio
from typing import Any

from libs.common.config import Settings
from services.identity import keys, schools, store


async def _states(pool: Any, school_id: int) -> dict[str, list[str]]:
    rows = await pool.fetch(
        "SELECT kid, state FROM signing_keys WHERE school_id = $1 AND alg = 'ES256'", school_id
    )
    out: dict[str, list[str]] = {"current": [], "next": [], "retired": []}
    for r in rows:
        out[r["state"]].append(r["kid"])
    return out


async def test_due_issuer_rotates_exactly_once_under_concurrent_schedulers(
    pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    school = await schools.create_school(pool, settings, f"sched{unique}", "Schedule School")
    before = await _states(pool, school.id)
    await pool.execute(
        "UPDATE signing_keys SET activated_at = now() - make_interval(secs => $2)"
        " WHERE school_id = $1 AND state = 'current'",
        school.id,
        settings.tokens.key_rotation_interval + 60,
    )

    results = await asyncio.gather(
        *(keys.rotate_if_due(pool, settings, school.id) for _ in range(4))
    )

    assert sum(r is not None for r in results) == 1
    after = await _states(pool, school.id)
    # The key published as `next` is the one that now signs; the old one is retired.
    assert after["current"] == before["next"]
    assert after["retired"] == before["current"]
    assert len(after["next"]) == 1 and after["next"] != before["next"]


async def test_fresh_issuer_is_not_due(pool: Any, settings: Settings, unique: str) -> None:
    school = await schools.create_school(pool, settings, f"fresh{unique}", "Fresh School")
    assert await keys.rotate_if_due(pool, settings, school.id) is None
    due = await store.issuers_due_for_rotation(pool, settings.tokens.key_rotation_interval)
    assert school.id not in due

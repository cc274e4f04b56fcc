"""Identity's Host-to-school cache: bounded whatever Host labels callers make up."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from libs.common.config import Settings
from services.identity import schools
from services.identity.schools import SchoolDirectory, UnknownSchool


def _host(settings: Settings, label: str) -> str:
    return settings.urls.school_origin(label).split("://", 1)[1]


async def test_unknown_hosts_do_not_grow_the_cache_past_its_bound(
    pool: Any, settings: Settings, unique: str
) -> None:
    school = await schools.create_school(pool, settings, f"dir{unique}", "Directory School")
    directory = SchoolDirectory(pool, settings, max_entries=20)
    assert (await directory.resolve(_host(settings, school.subdomain))).school == school
    for _ in range(200):
        with pytest.raises(UnknownSchool):
            await directory.resolve(_host(settings, f"nope{secrets.token_hex(6)}"))
        assert len(directory) <= 20
    # The real school was pushed out by the flood, and is simply looked up again.
    assert (await directory.resolve(_host(settings, school.subdomain))).school == school
    assert len(directory) <= 20


async def test_recently_used_schools_outlive_a_flood_of_unknown_labels(
    pool: Any, settings: Settings, unique: str
) -> None:
    school = await schools.create_school(pool, settings, f"lru{unique}", "LRU School")
    directory = SchoolDirectory(pool, settings, max_entries=5)
    host = _host(settings, school.subdomain)
    await directory.resolve(host)
    for _ in range(50):
        # In use between the unknown ones: never the least recently used.
        await directory.resolve(host)
        with pytest.raises(UnknownSchool):
            await directory.resolve(_host(settings, f"nope{secrets.token_hex(6)}"))
    assert school.subdomain in directory._by_subdomain


async def test_an_unknown_school_is_remembered_only_briefly(
    pool: Any, settings: Settings, unique: str
) -> None:
    directory = SchoolDirectory(pool, settings, negative_ttl=0)
    label = f"late{unique}"
    with pytest.raises(UnknownSchool):
        await directory.resolve(_host(settings, label))
    # Created after the miss: found at once, not after the positive entries' lifetime.
    school = await schools.create_school(pool, settings, label, "Late School")
    assert (await directory.resolve(_host(settings, label))).school == school


async def test_labels_no_dns_name_can_carry_are_refused_uncached(
    pool: Any, settings: Settings
) -> None:
    directory = SchoolDirectory(pool, settings)
    with pytest.raises(UnknownSchool):
        await directory.resolve(_host(settings, "a" * 5000))
    assert len(directory) == 0

"""Ids people type, paste and pass on command lines never begin with '-' or '_'.

A client id beginning with '-' reads as an option to the CLI (`--client -abc`) and is quoted as
a formula by the audit CSV export ('-abc), so it is not the id any more where it is read.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from unittest import mock

import asyncpg
from hypothesis import given
from hypothesis import strategies as st

from libs.common.config import Settings
from services.dev import seed
from services.identity import clients, credentials, schools

BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{23}")

# Draws as secrets.token_urlsafe could return them; those beginning with '-' or '_' included.
_draw = st.text(alphabet=BASE64URL, min_size=1, max_size=40)
_good_draw = _draw.filter(lambda s: s[0] not in "-_")


def _feeding(draws: list[str]) -> Iterator[str]:
    yield from draws
    raise AssertionError("drew again after a usable id")


@given(bad=st.lists(_draw.filter(lambda s: s[0] in "-_"), max_size=5), good=_good_draw)
def test_a_draw_beginning_with_a_dash_or_underscore_is_drawn_again(
    bad: list[str], good: str
) -> None:
    """Whatever the random source gives, the id is its first draw that begins with a letter or
    digit, unchanged (the rest of it keeps every base64url character)."""
    feed = _feeding([*bad, good])
    asked: list[int] = []

    def token_urlsafe(nbytes: int) -> str:
        asked.append(nbytes)
        return next(feed)

    with mock.patch.object(secrets, "token_urlsafe", token_urlsafe):
        assert credentials.new_id(9) == good
        assert asked == [9] * (len(bad) + 1)


def test_many_client_ids_and_none_begins_with_a_dash_or_underscore() -> None:
    """The real random source, drawn often enough that 1 in 32 would show many times over;
    '-' and '_' still occur inside ids, so the alphabet (and the entropy) is base64url's."""
    ids = [credentials.new_client_id() for _ in range(5000)]
    assert all(_CLIENT_ID.fullmatch(i) for i in ids), [i for i in ids if not _CLIENT_ID.match(i)]
    assert len(set(ids)) == len(ids)
    inside = "".join(i[1:] for i in ids)
    assert "-" in inside and "_" in inside
    # Every allowed first character turns up: no letter or digit is dropped from the front.
    assert {i[0] for i in ids} == set(BASE64URL) - {"-", "_"}


async def test_clients_made_anywhere_get_such_ids(
    pool: asyncpg.Pool, settings: Settings, unique: str
) -> None:
    """Every way a client is made (admin pages, CLI, registration) goes through
    clients.create_client: given a random source whose first draws begin with '-' and '_',
    the client still gets an id that does not."""
    school = await schools.create_school(pool, settings, f"ids{unique}", "Id School")
    real = secrets.token_urlsafe
    for created_via in ("admin", "cli", "registration"):
        queued = ["-" + real(18)[1:], "_" + real(18)[1:], "Q" + real(18)[1:]]

        def token_urlsafe(nbytes: int | None = None, queued: list[str] = queued) -> str:
            # The 18-byte draws are the client id's; secrets keep their own random values.
            return queued.pop(0) if nbytes == 18 and queued else real(nbytes)

        with mock.patch.object(secrets, "token_urlsafe", token_urlsafe):
            made = await clients.create_client(
                pool,
                settings,
                school=school,
                name=f"App {created_via}",
                redirect_uris=["https://app.example/cb"],
                created_via=created_via,
            )
        assert made.client.id.startswith("Q"), made.client.id
        assert not queued


def test_demo_admin_passwords_never_begin_with_a_dash_or_underscore() -> None:
    """`make dev` prints them to be pasted, `--password -x...` included."""
    with mock.patch.object(
        credentials.secrets, "token_urlsafe", side_effect=["-first", "_again", "Fine-pw"]
    ):
        assert seed.demo_password() == "Fine-pw"
    drawn = [seed.demo_password() for _ in range(2000)]
    assert all(p[0] not in "-_" and len(p) == 16 for p in drawn)

"""PKCE (RFC 7636) as services/identity/pkce.py holds it: the authorization request's challenge
and the token request's verifier. The code flows themselves are tested end to end in
test_authorize.py and test_token_endpoint.py; here each half is tried with its variants, and
the challenge check is held to the very words the authorization endpoint answers with."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest

from libs.common.config import Settings
from libs.common.errors import InvalidRequest, OAuthError
from services.identity import pkce
from tests.test_authorize import REDIRECT, World, assert_error_redirect, make_world

# RFC 7636 Appendix B.
RFC_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"

# (code_challenge, code_challenge_method) an authorization request must be refused for.
BAD_CHALLENGES = [
    (None, "S256"),
    (None, None),
    (None, "plain"),
    (RFC_CHALLENGE, None),
    (RFC_CHALLENGE, "plain"),
    (RFC_CHALLENGE, "s256"),
    (RFC_CHALLENGE, "S512"),
    (RFC_CHALLENGE, ""),
    ("", "S256"),
    ("short", "S256"),
    (RFC_CHALLENGE[:-1], "S256"),
    (RFC_CHALLENGE + "A", "S256"),
    (RFC_CHALLENGE + "=", "S256"),
    (RFC_CHALLENGE[:-2] + "+/", "S256"),
    (RFC_CHALLENGE[:-1] + ".", "S256"),
    (RFC_CHALLENGE[:-1] + "é", "S256"),
    (RFC_CHALLENGE[:-1] + "%", "S256"),
]


def test_the_rfc_example_challenge_is_accepted_and_verified() -> None:
    assert pkce.check_challenge(RFC_CHALLENGE, "S256") == RFC_CHALLENGE
    assert pkce.s256_challenge(RFC_VERIFIER) == RFC_CHALLENGE
    assert pkce.verifier_matches(RFC_VERIFIER, RFC_CHALLENGE)


@pytest.mark.parametrize(("challenge", "method"), BAD_CHALLENGES)
def test_challenges_other_than_s256_of_43_base64url_characters_are_invalid_request(
    challenge: str | None, method: str | None
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        pkce.check_challenge(challenge, method)
    assert refused.value.error == "invalid_request" and refused.value.status == 400
    assert refused.value.description


def test_a_missing_method_is_refused_rather_than_taken_as_plain() -> None:
    # RFC 7636 4.3 would default the method to plain, which this server never accepts.
    with pytest.raises(InvalidRequest, match="code_challenge_method is required"):
        pkce.check_challenge(RFC_CHALLENGE, None)
    with pytest.raises(InvalidRequest, match="must be S256"):
        pkce.check_challenge(RFC_VERIFIER, "plain")


@pytest.mark.parametrize(
    "verifier",
    [
        None,
        "",
        RFC_VERIFIER[:42],  # one short of RFC 7636 4.1's 43
        RFC_VERIFIER + "x",  # a different verifier of a valid length
        RFC_VERIFIER.upper(),
        " " + RFC_VERIFIER,
        RFC_VERIFIER + " ",
        RFC_VERIFIER[:-1] + "+",  # not unreserved
        RFC_VERIFIER[:-1] + "/",
        RFC_VERIFIER[:-1] + "=",
        RFC_VERIFIER[:-1] + "é",
        RFC_CHALLENGE,  # the challenge itself, as `plain` would have it
    ],
)
def test_a_verifier_that_is_not_the_secret_behind_the_challenge_does_not_match(
    verifier: str | None,
) -> None:
    assert not pkce.verifier_matches(verifier, RFC_CHALLENGE)


@pytest.mark.parametrize("length", [43, 44, 100, 128, 129, 200])
def test_verifier_lengths_follow_rfc_7636_4_1(length: int) -> None:
    verifier = ("abcDEF123-._~" * 20)[:length]
    matches = pkce.verifier_matches(verifier, pkce.s256_challenge(verifier))
    assert matches is (43 <= length <= 128)


def test_the_challenge_is_compared_whole() -> None:
    challenge = pkce.s256_challenge(RFC_VERIFIER)
    for other in (challenge[:-1], challenge + "A", challenge + "=", "", challenge.lower()):
        assert not pkce.verifier_matches(RFC_VERIFIER, other)


@pytest.fixture
async def world(
    identity_url: str, pool: asyncpg.Pool, settings: Settings, unique: str, identity_port: int
) -> World:
    return await make_world(pool, settings, unique, identity_port)


async def test_check_challenge_says_what_the_authorization_endpoint_says(
    world: World, http: Any
) -> None:
    """The authorization endpoint is to take its PKCE check from pkce.py: until it does, the
    two must refuse the same requests in the same words. (The endpoint reads an empty
    parameter as an absent one, RFC 6749 3.1, so both are tried.)"""
    for challenge, method in BAD_CHALLENGES:
        with pytest.raises(OAuthError) as refused:
            pkce.check_challenge(challenge or None, method or None)
        query = {"response_type": "code", "client_id": world.client.id}
        query |= {"redirect_uri": REDIRECT, "state": "pk"}
        if challenge is not None:
            query["code_challenge"] = challenge
        if method is not None:
            query["code_challenge_method"] = method
        url = f"{world.base}/v1/oauth/authorize?{urlencode(query)}"
        async with http.get(url, allow_redirects=False) as resp:
            answered = assert_error_redirect(
                resp.status, resp.headers, "invalid_request", state="pk", issuer=world.base
            )
        assert answered["error_description"] == refused.value.description, (challenge, method)

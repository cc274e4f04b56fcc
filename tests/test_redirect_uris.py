"""RFC 8252's two loopback rules, as redirect_uris.py keeps them apart on purpose.

Registration takes plain http on `localhost` and on any loopback IP (RFC 8252 7.3, and 8.3:
localhost is "NOT RECOMMENDED", not forbidden); the authorization endpoint lets only the IP
literals 127.0.0.1 and [::1] vary their port (7.3's "loopback IP redirect URIs"). A change that
made the two one predicate would fail here (and in test_authorize's loopback test end to end).
"""

from __future__ import annotations

import pytest

from libs.common.errors import InvalidRedirectUri
from services.identity import redirect_uris


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1/cb",
        "http://127.0.0.1:8000/cb",
        "http://127.0.0.2:8000/cb",
        "http://[::1]/cb",
        "http://[::1]:6000/cb",
        "http://localhost/cb",
        "http://localhost:8000/cb",
        "https://app.example/cb",
        "com.example.app:/cb",
    ],
)
def test_registration_takes_loopback_hosts_localhost_included(uri: str) -> None:
    assert redirect_uris.validate_redirect_uri(uri) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "http://app.example/cb",
        "http://localhost.evil.example/cb",
        "http://127.0.0.1.evil.example/cb",
        "http://evil.example\\@127.0.0.1/cb",
        "http://evil.example@localhost/cb",
        "http://127.0.0.1/cb#frag",
        "http://127.0.0.1/*",
        "myapp:/cb",
        "/cb",
    ],
)
def test_registration_refuses_the_rest(uri: str) -> None:
    with pytest.raises(InvalidRedirectUri):
        redirect_uris.validate_redirect_uri(uri)


@pytest.mark.parametrize(
    ("requested", "registered"),
    [
        ("http://127.0.0.1:51234/cb", "http://127.0.0.1:8000/cb"),
        ("http://127.0.0.1/cb", "http://127.0.0.1:8000/cb"),
        ("http://127.0.0.1:51234/cb", "http://127.0.0.1/cb"),
        ("http://[::1]:6000/cb", "http://[::1]:8000/cb"),
        ("http://localhost:8000/cb", "http://localhost:8000/cb"),
        ("https://app.example/cb", "https://app.example/cb"),
    ],
)
def test_matching_lets_loopback_ip_literals_vary_their_port(
    requested: str, registered: str
) -> None:
    assert redirect_uris.matches(requested, registered)


@pytest.mark.parametrize(
    ("requested", "registered"),
    [
        # A name, not an IP literal: it can resolve anywhere, so no port exception (8.3).
        ("http://localhost:51234/cb", "http://localhost:8000/cb"),
        # Registrable as loopback, but not one of 7.3's two literals.
        ("http://127.0.0.2:51234/cb", "http://127.0.0.2:8000/cb"),
        ("http://127.0.0.1:51234/cb", "http://[::1]:8000/cb"),
        ("http://127.0.0.1:51234/other", "http://127.0.0.1:8000/cb"),
        ("http://127.0.0.1:51234/cb?x=1", "http://127.0.0.1:8000/cb"),
        ("http://127.0.0.1:51234/cb/", "http://127.0.0.1:8000/cb"),
        ("https://127.0.0.1:51234/cb", "https://127.0.0.1:8000/cb"),
        ("http://127.0.0.1:99999/cb", "http://127.0.0.1:8000/cb"),
        ("http://127.0.0.1:0/cb", "http://127.0.0.1:8000/cb"),
        ("http://user@127.0.0.1:8000/cb", "http://127.0.0.1:8000/cb"),
        ("https://app.example:444/cb", "https://app.example/cb"),
        ("https://APP.example/cb", "https://app.example/cb"),
    ],
)
def test_matching_is_exact_for_everything_else(requested: str, registered: str) -> None:
    assert not redirect_uris.matches(requested, registered)


def test_the_two_predicates_differ_on_localhost() -> None:
    assert redirect_uris.is_loopback_host("localhost")
    assert redirect_uris.loopback_ip_redirect("http://localhost:8000/cb") is None
    assert redirect_uris.loopback_ip_redirect("http://127.0.0.1:8000/cb") == (
        "127.0.0.1",
        "/cb",
        "",
        "8000",
    )

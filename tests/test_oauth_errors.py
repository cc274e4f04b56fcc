"""libs/common/errors.py: one class per OAuth error code, and the two shapes they answer in
(RFC 6749 5.2 at the OAuth endpoints, RFC 6750 3 at a protected resource). The endpoints'
own answers are tested over HTTP in their test files; here the classes themselves."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from libs.common import errors
from libs.common.errors import (
    ERROR_CLASSES,
    AuthenticationRequired,
    InsufficientScope,
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidToken,
    NotFound,
    OAuthError,
    OAuthErrorCode,
    SlowDown,
)

# Each code and the status RFC 6749 5.2 (or the RFC that added the code) gives it.
STATUS = {
    "invalid_request": 400,
    "invalid_client": 401,
    "invalid_grant": 400,
    "unauthorized_client": 400,
    "unsupported_grant_type": 400,
    "unsupported_response_type": 400,
    "invalid_scope": 400,
    "access_denied": 403,
    "server_error": 500,
    "temporarily_unavailable": 503,
    "invalid_redirect_uri": 400,
    "invalid_client_metadata": 400,
    "invalid_token": 401,
    "insufficient_scope": 403,
    "unsupported_token_type": 400,
    "slow_down": 429,
    "invalid_target": 400,
    "login_required": 400,
    "consent_required": 400,
    "interaction_required": 400,
    "request_not_supported": 400,
    "request_uri_not_supported": 400,
    "not_found": 404,
}


def _body(response: web.Response) -> dict[str, object]:
    body = response.body
    assert isinstance(body, bytes)
    parsed = orjson.loads(body)
    assert isinstance(parsed, dict)
    return parsed


def test_every_code_has_one_class_carrying_its_code_and_status() -> None:
    assert {code: cls.status for code, cls in ERROR_CLASSES.items()} == STATUS
    for code, cls in ERROR_CLASSES.items():
        assert cls.error == code and issubclass(cls, OAuthError)
        raised = cls("why")
        assert (raised.error, raised.status, raised.description) == (code, STATUS[code], "why")
        # Each names the specification that defines its code.
        assert cls.__doc__ and (
            "RFC" in cls.__doc__ or "OIDC" in cls.__doc__ or "ours" in cls.__doc__
        )
    # Every class of the module is in the table, but the bare challenge (not a code of its own).
    defined = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, OAuthErrorCode) and cls is not OAuthErrorCode
    }
    assert defined - set(ERROR_CLASSES.values()) == {AuthenticationRequired}


@pytest.mark.parametrize("code", sorted(STATUS))
def test_the_code_string_form_answers_as_its_class_does(code: str) -> None:
    """`OAuthError(code, description)`, for modules not yet converted, keeps its old meaning:
    the RFC's status for the code, the same body and headers as the class."""
    by_string = OAuthError(code, "the same words")
    by_class = ERROR_CLASSES[code]("the same words")
    assert by_string.status == by_class.status == STATUS[code]
    old, new = by_string.response(), by_class.response()
    assert old.status == new.status
    assert _body(old) == _body(new) == {"error": code, "error_description": "the same words"}
    assert dict(old.headers) == dict(new.headers)


def test_a_code_without_a_class_is_still_a_400() -> None:
    unknown = OAuthError("something_else", "x")
    assert unknown.status == 400 and unknown.response().status == 400


def test_status_and_headers_may_be_given_per_raise() -> None:
    slow = SlowDown("too many", headers={"Retry-After": "7"})
    answer = slow.response()
    assert answer.status == 429 and answer.headers["Retry-After"] == "7"
    assert answer.headers["Cache-Control"] == "no-store"
    assert InvalidRequest("use the Bearer scheme", status=401).status == 401
    assert NotFound("No school answers at this address.").response().status == 404
    legacy = OAuthError("not_found", "No school answers at this address.", status=404)
    assert legacy.status == 404 and isinstance(legacy, OAuthError)


def test_invalid_client_names_the_basic_scheme_and_others_do_not() -> None:
    # RFC 6749 5.2: a 401 for client authentication carries WWW-Authenticate.
    answer = InvalidClient("client authentication failed").response()
    assert answer.status == 401
    assert answer.headers["WWW-Authenticate"] == 'Basic realm="loopwise-connect"'
    assert answer.headers["Cache-Control"] == "no-store" and answer.headers["Pragma"] == "no-cache"
    assert _body(answer) == {
        "error": "invalid_client",
        "error_description": "client authentication failed",
    }
    assert "WWW-Authenticate" not in InvalidGrant("x").response().headers
    assert "WWW-Authenticate" not in InvalidToken("x").response().headers
    assert "error_description" not in _body(InvalidGrant().response())


def test_bearer_answers_follow_rfc_6750() -> None:
    invalid = InvalidToken("the access token has been revoked").bearer_response()
    assert invalid.status == 401
    assert invalid.headers["WWW-Authenticate"] == (
        'Bearer realm="loopwise-connect", error="invalid_token", '
        'error_description="the access token has been revoked"'
    )
    assert _body(invalid) == {
        "error": "invalid_token",
        "error_description": "the access token has been revoked",
    }

    scope = InsufficientScope("the openid scope is required").bearer_response(scope="openid")
    assert scope.status == 403
    assert 'error="insufficient_scope"' in scope.headers["WWW-Authenticate"]
    assert 'scope="openid"' in scope.headers["WWW-Authenticate"]
    assert _body(scope)["scope"] == "openid"

    # RFC 6750 3.1: no credentials at all is a bare challenge, without an error code.
    bare = AuthenticationRequired().bearer_response()
    assert bare.status == 401
    assert bare.headers["WWW-Authenticate"] == 'Bearer realm="loopwise-connect"'
    assert _body(bare) == {"error": "invalid_request"}

    # A description with a double quote cannot end the header's quoted string early.
    quoted = InvalidRequest('say "hi"', status=401).bearer_response()
    assert "error_description=\"say 'hi'\"" in quoted.headers["WWW-Authenticate"]

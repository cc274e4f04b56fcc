"""Logs are JSON lines that never carry a token, secret or password, however it got there."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from libs.common.logging import REDACTED, configure_logging, get_logger

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    """Configure logging as a service does, writing into a buffer; parse what it wrote.

    configure_logging binds its stream when called, so stderr is swapped only for the call.
    """
    buffer = io.StringIO()
    real_stderr = sys.stderr
    sys.stderr = buffer
    try:
        configure_logging("debug", service="logtest")
    finally:
        sys.stderr = real_stderr

    def lines() -> list[dict[str, Any]]:
        text = buffer.getvalue()
        assert text.endswith("\n")
        # Every line is one JSON object: json.loads fails the test otherwise.
        parsed = [json.loads(line) for line in text.splitlines()]
        assert all(isinstance(p, dict) for p in parsed)
        return parsed

    yield lines
    configure_logging("warning")


def _jwt() -> str:
    key = ECKey.generate_key("P-256", private=True)
    claims = {"sub": "u1", "exp": int(time.time()) + 60, "jti": secrets.token_hex(8)}
    return jwt.encode({"alg": "ES256", "typ": "at+jwt"}, claims, key)


def _opaque(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def _assert_absent(lines: list[dict[str, Any]], *secret_values: str) -> None:
    text = json.dumps(lines)
    for value in secret_values:
        assert value not in text
        # Not even a recognisable piece of it.
        assert value[-12:] not in text


def test_named_secret_fields_are_redacted(log_lines: Lines) -> None:
    """Fields named like credentials are blanked whatever their value looks like."""
    password = "hunter2-" + secrets.token_hex(6)
    client_secret = _opaque("lcs_")
    refresh_token = _opaque("lcr_")
    get_logger("t").info(
        "login",
        password=password,
        client_secret=client_secret,
        refresh_token=refresh_token,
        session_cookie="abc" + secrets.token_hex(8),
    )
    (line,) = log_lines()
    _assert_absent([line], password, client_secret, refresh_token)
    for field in ("password", "client_secret", "refresh_token", "session_cookie"):
        assert line[field] == REDACTED


def test_secret_shaped_values_are_redacted_anywhere(log_lines: Lines) -> None:
    """A JWT in the message, a Bearer value in a field, our prefixed secrets inside longer
    text: each is cut out wherever it appears."""
    token = _jwt()
    bearer = secrets.token_urlsafe(24)
    client_secret = _opaque("lcs_")
    refresh_token = _opaque("lcr_")
    # Standard Webhooks secrets are standard base64: `+` and `/` belong to the secret.
    webhook_secret = "whsec_" + base64.b64encode(b"\xfb\xef" + secrets.token_bytes(22)).decode()
    log = get_logger("t")
    log.info(f"issued {token} to the client")
    log.info("upstream call", auth_header=f"Bearer {bearer}")
    log.info("created", note=f"client made; secret {client_secret} shown once.")
    log.info("rotated", url=f"https://app.example/cb?rt={refresh_token}&state=x")
    log.info("subscribed", detail=f"signing with {webhook_secret} from now on")
    log.info("listed", items=[f"Bearer {bearer}", {"t": token}])
    lines = log_lines()
    assert len(lines) == 6
    _assert_absent(lines, token, bearer, client_secret, refresh_token, webhook_secret)
    assert lines[0]["event"] == f"issued {REDACTED} to the client"
    assert lines[1]["auth_header"] == REDACTED
    assert lines[2]["note"] == f"client made; secret {REDACTED} shown once."
    assert lines[3]["url"] == f"https://app.example/cb?rt={REDACTED}&state=x"
    assert lines[4]["detail"] == f"signing with {REDACTED} from now on"


def test_credentials_pasted_as_pairs_in_text_are_redacted(log_lines: Lines) -> None:
    """`password=...`, a form body or a JSON text with secrets, pasted into a log line."""
    password = "hunter2-" + secrets.token_hex(6)
    client_secret = secrets.token_hex(16)  # a foreign-format secret: no recognisable prefix
    refresh_token = secrets.token_hex(16)
    log = get_logger("t")
    log.warning(f"login failed for ann@example.com password={password}")
    log.info(
        "token request",
        body=f"grant_type=refresh_token&refresh_token={refresh_token}"
        f"&client_secret={client_secret}&client_id=app1",
    )
    log.info("payload", raw=json.dumps({"client_secret": client_secret, "password": password}))
    lines = log_lines()
    _assert_absent(lines, password, client_secret, refresh_token)
    assert lines[0]["event"] == f"login failed for ann@example.com password={REDACTED}"
    body = lines[1]["body"]
    assert body.startswith("grant_type=refresh_token&")
    assert body.endswith("&client_id=app1")


def test_nested_headers_are_redacted(log_lines: Lines) -> None:
    """A secret-named key deep inside a dict field is blanked; its neighbours stay."""
    bearer = secrets.token_urlsafe(24)
    cookie = secrets.token_urlsafe(24)
    get_logger("t").info(
        "request",
        request={
            "headers": {
                "Authorization": f"Bearer {bearer}",
                "Cookie": f"lc_session={cookie}",
                "Content-Type": "application/json",
            },
            "path": "/v1/oauth/token",
        },
    )
    (line,) = log_lines()
    _assert_absent([line], bearer, cookie)
    headers = line["request"]["headers"]
    assert headers["Authorization"] == REDACTED
    assert headers["Cookie"] == REDACTED
    assert headers["Content-Type"] == "application/json"
    assert line["request"]["path"] == "/v1/oauth/token"


def test_stdlib_logging_is_redacted_json(log_lines: Lines) -> None:
    """Records from libraries logging through the standard module get the same treatment."""
    token = _jwt()
    logging.getLogger("x").warning("token %s", token)
    (line,) = log_lines()
    _assert_absent([line], token)
    assert line["event"] == f"token {REDACTED}"
    assert line["level"] == "warning"


def test_exception_text_is_redacted(log_lines: Lines) -> None:
    """A traceback whose message carries a token is scrubbed too."""
    token = _jwt()
    try:
        raise ValueError(f"could not verify {token}")
    except ValueError:
        get_logger("t").exception("verify_failed")
    (line,) = log_lines()
    _assert_absent([line], token)
    assert "ValueError: could not verify" in line["exception"]


def test_harmless_fields_pass_unchanged(log_lines: Lines) -> None:
    """Redaction is targeted: ordinary context survives exactly, so logs stay useful."""
    fields: dict[str, Any] = {
        "school": "demo",
        "client_id": "Hx3v9QpL2mT8wRzY4bN6cK1s",
        "path": "/v1/oauth/token",
        "method": "POST",
        "status": 200,
        "scope": "courses:read students:read",
        "grant_type": "refresh_token",
        "kid": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k",
        "request_id": "7f1c2d9e-1b2a-4c3d-9e8f-0a1b2c3d4e5f",
    }
    get_logger("t").info("token_issued", **fields)
    (line,) = log_lines()
    for name, value in fields.items():
        assert line[name] == value, name
    assert line["event"] == "token_issued"
    assert line["service"] == "logtest"
    assert line["level"] == "info"
    assert "timestamp" in line


async def test_the_access_line_scrubs_the_path_and_keeps_its_own_fields(
    log_lines: Lines, aiohttp_client: Any
) -> None:
    """The access log skips the scan of the fields it fills itself, never of the path: a token
    pasted into a URL is blanked there too, and the query is never logged."""
    from aiohttp import web

    from libs.common.web import base_application

    app = base_application("logtest")

    async def anything(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/{tail:.*}", anything)
    client = await aiohttp_client(app)
    token, secret = _jwt(), _opaque("lcs_")
    resp = await client.get(f"/api/v1/courses/{token}?client_secret={secret}&x=1")
    assert resp.status == 200
    access = [line for line in log_lines() if line.get("event") == "access"]
    assert len(access) == 1
    line = access[0]
    assert line["path"] == f"/api/v1/courses/{REDACTED}"
    assert line["method"] == "GET" and line["status"] == 200 and line["duration_ms"] >= 0
    assert line["service"] == "logtest" and line["level"] == "info" and line["request_id"]
    _assert_absent(log_lines(), token, secret)

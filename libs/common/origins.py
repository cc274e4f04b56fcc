"""Web origins (RFC 6454) as browsers serialise them: scheme and host in lower case, no port
where it is the scheme's default. A registered origin and an `Origin` header are compared in
this form by identity and by the gateway alike, so `https://App.example.com:443` registered
matches what a browser sends for it, `https://app.example.com`."""

from __future__ import annotations

from urllib.parse import urlsplit

_DEFAULT_PORTS = {"https": ":443", "http": ":80"}


def normalise(origin: str) -> str:
    """The browser form of `origin`; what does not parse as one is only trimmed and lowered
    (it then equals nothing registered)."""
    lowered = origin.strip().lower()
    parts = urlsplit(lowered)
    netloc = parts.netloc
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return f"{parts.scheme}://{netloc}" if parts.scheme and netloc else lowered

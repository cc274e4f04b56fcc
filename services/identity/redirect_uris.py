"""Redirect URIs (RFC 6749 3.1.2, RFC 8252 7 and 8.3): which may be registered, and which
registered one a request's `redirect_uri` names.

Registration (`validate_redirect_uri`) and the authorization endpoint (`matches`) follow two
sentences of RFC 8252 that differ on purpose, so the two loopback predicates are named apart:

- `is_loopback_host`: may a plain-http URI be registered for this host? RFC 8252 7.3 allows
  loopback IP redirects, and 8.3 says of `localhost`: "While redirect URIs using localhost
  (i.e., "http://localhost:{port}/{path}") function similarly to loopback IP redirects [...],
  the use of localhost is NOT RECOMMENDED": allowed, not recommended, so registration takes
  `localhost` and any loopback IP.
- `loopback_ip_redirect`: may the request's port differ from the registered one? RFC 8252
  7.3: "The authorization server MUST allow any port to be specified at the time of the
  request for loopback IP redirect URIs", and those are `http://127.0.0.1:{port}/{path}` and
  `http://[::1]:{port}/{path}`; `localhost` is no IP literal (8.3: it can resolve anywhere),
  so it matches exactly or not at all.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from libs.common.errors import InvalidRedirectUri, OAuthErrorCode

# The two IP literals RFC 8252 7.3 names for loopback IP redirects, with an optional port.
_LOOPBACK_IP_NETLOC = re.compile(r"^(127\.0\.0\.1|\[::1\])(?::([0-9]{1,5}))?$")


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback IP: a host plain http may be registered for (RFC 8252 7.3,
    8.3). Also the rule for plain-http origins and pages a client registers."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_ambiguous_authority(uri: str, netloc: str, error: type[OAuthErrorCode]) -> None:
    """Browsers parse http(s) URLs by the WHATWG rules, where a backslash is a slash, and
    userinfo moves the host: `http://evil.example\\@127.0.0.1/cb` is 127.0.0.1 to urlsplit
    but evil.example to a browser. A URI they could read two ways is refused, whatever the
    scheme, so the host checked here is the host the browser goes to."""
    if "\\" in uri or "@" in netloc:
        raise error(f"{uri!r} has a backslash or userinfo")


def validate_redirect_uri(uri: str) -> str:
    """https, or http on a loopback host for native apps (RFC 8252 7.3, 8.3); no fragments
    (RFC 6749 3.1.2) or wildcards; a private-use scheme (RFC 8252 7.1) in reverse-domain form
    is allowed too."""
    parts = urlsplit(uri)
    if not parts.scheme or "*" in uri or any(c.isspace() or ord(c) < 0x20 for c in uri):
        raise InvalidRedirectUri(f"{uri!r} is not an absolute URI")
    refuse_ambiguous_authority(uri, parts.netloc, InvalidRedirectUri)
    if parts.fragment or "#" in uri:
        raise InvalidRedirectUri("redirect URIs may not have a fragment")
    if parts.scheme == "https":
        if not parts.hostname:
            raise InvalidRedirectUri(f"{uri!r} has no host")
    elif parts.scheme == "http":
        if not parts.hostname or not is_loopback_host(parts.hostname):
            raise InvalidRedirectUri("http redirect URIs are allowed only on loopback")
    elif "." not in parts.scheme:
        raise InvalidRedirectUri(
            "redirect URIs must be https, http on loopback, or a reverse-domain private scheme"
        )
    return uri


def loopback_ip_redirect(uri: str) -> tuple[str, str, str, str] | None:
    """(host, path, query, port) of an `http://127.0.0.1` or `http://[::1]` URI (RFC 8252
    7.3's loopback IP redirects), else None: the only URIs whose port may vary."""
    parts = urlsplit(uri)
    match = _LOOPBACK_IP_NETLOC.match(parts.netloc)
    if parts.scheme != "http" or match is None or parts.fragment:
        return None
    return match.group(1), parts.path, parts.query, match.group(2) or ""


def matches(requested: str, registered: str) -> bool:
    """Exact string match (RFC 6749 3.1.2.3, RFC 9700 2.1), except that a loopback IP
    redirect may differ in its port only (RFC 8252 7.3). `localhost` gets no such exception:
    it can resolve anywhere (RFC 8252 8.3)."""
    if requested == registered:
        return True
    asked, known = loopback_ip_redirect(requested), loopback_ip_redirect(registered)
    if asked is None or known is None:
        return False
    port = asked[3]
    if port and not 0 < int(port) < 65536:
        return False
    return asked[:3] == known[:3]

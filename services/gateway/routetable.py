"""The route table: which paths pass through, which are protected, where each goes, and the
scopes each method needs. It lives in a TOML file (deploy/routes.toml), not in code.

The file is read and validated once at start. Any mistake (TOML syntax, an unknown upstream,
scope, method or key, a duplicate prefix) raises :class:`RouteTableError` naming the file and
line, and the gateway does not start: a half-understood route table must never serve.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from libs.common import scopes as catalogue
from libs.common.config import Settings

# OPTIONS is not routable: the gateway answers CORS preflights itself.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
READ_METHODS = ("GET", "HEAD")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")

_PUBLIC_KEYS = frozenset({"prefix", "upstream", "max_body"})
_ROUTE_KEYS = frozenset({"prefix", "upstream", "read", "write", "all_methods", "methods"})
_TOP_KEYS = frozenset({"upstreams", "public", "route"})
_UPSTREAM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")


class RouteTableError(ValueError):
    """The route file is wrong; the message names the file and, where known, the line."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    upstream: str
    protected: bool
    # Method to its any-of scopes; an empty tuple admits any valid token of the school.
    scopes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    line: int | None = None
    # A public route's largest request body in bytes (`max_body`), counted as it streams
    # through; None: no limit here (the upstream sets its own).
    max_body: int | None = None

    def required(self, method: str) -> tuple[str, ...] | None:
        """The any-of scopes `method` needs here; None when the method is not routed."""
        return self.scopes.get(method)

    @property
    def allowed_methods(self) -> tuple[str, ...]:
        return tuple(m for m in METHODS if m in self.scopes)


class RouteTable:
    """Routes by prefix; a path finds its route by walking up its segments (longest first)."""

    def __init__(self, routes: list[Route], upstreams: Mapping[str, str], source: str) -> None:
        self.routes = routes
        self.upstreams = dict(upstreams)
        self.source = source
        self._by_prefix = {r.prefix: r for r in routes}

    def match(self, path: str) -> Route | None:
        by_prefix = self._by_prefix
        candidate = path.rstrip("/") or "/"
        while True:
            route = by_prefix.get(candidate)
            if route is not None:
                return route
            if candidate == "/":
                return None
            candidate = candidate[: candidate.rfind("/")] or "/"

    @property
    def protected(self) -> list[Route]:
        return [r for r in self.routes if r.protected]

    @property
    def public(self) -> list[Route]:
        return [r for r in self.routes if not r.protected]


def configured_upstreams(settings: Settings) -> dict[str, str]:
    return {
        "identity": settings.upstreams.identity,
        "school_api": settings.upstreams.school_api,
        "webhooks": settings.upstreams.webhooks,
    }


class _Lines:
    """Finds where in the file text the n-th `[[route]]` (or `[[public]]`) and its keys are,
    so a semantic error can name a line even though tomllib keeps no positions."""

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines()

    def table(self, kind: str, index: int) -> tuple[int | None, int | None]:
        header = re.compile(r"^\s*\[\[\s*" + re.escape(kind) + r"\s*\]\]\s*(#.*)?$")
        any_header = re.compile(r"^\s*\[")
        seen = -1
        for number, line in enumerate(self._lines, start=1):
            if header.match(line):
                seen += 1
                if seen == index:
                    end = next(
                        (
                            n
                            for n in range(number + 1, len(self._lines) + 1)
                            if any_header.match(self._lines[n - 1])
                            and not re.match(
                                r"^\s*\[\s*" + re.escape(kind) + r"\.", self._lines[n - 1]
                            )
                        ),
                        len(self._lines) + 1,
                    )
                    return number, end
        return None, None

    def key(self, kind: str, index: int, key: str) -> int | None:
        start, end = self.table(kind, index)
        if start is None or end is None:
            return None
        first = key.split(".")[0]
        pattern = re.compile(
            r"^\s*(\[\s*" + re.escape(kind) + r"\.)?[\"']?" + re.escape(first) + r"\b"
        )
        for number in range(start + 1, end):
            if pattern.match(self._lines[number - 1]):
                return number
        return start

    def top(self, key: str) -> int | None:
        pattern = re.compile(r"^\s*(\[+\s*)?" + re.escape(key) + r"\b")
        for number, line in enumerate(self._lines, start=1):
            if pattern.match(line):
                return number
        return None


def _entry_error(
    lines: _Lines, source: str, entry: tuple[str, int], problem: str, key: str | None = None
) -> RouteTableError:
    kind, index = entry
    at = lines.key(kind, index, key) if key else lines.table(kind, index)[0]
    return RouteTableError(source, at, problem)


def _normalise_prefix(raw: Any) -> str | None:
    if not isinstance(raw, str) or not raw.startswith("/"):
        return None
    if any(c.isspace() for c in raw) or any(c in raw for c in "?#*\\%"):
        return None
    if "//" in raw or "/./" in raw + "/" or "/../" in raw + "/":
        return None
    return raw.rstrip("/") or "/"


def _scope_list(raw: Any) -> tuple[str, ...] | str:
    """The any-of list, or a problem to report."""
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        return "must be a list of scope names"
    unknown = catalogue.unknown(raw)
    if unknown:
        return f"unknown scope {unknown[0]!r} (not in the scope catalogue)"
    return tuple(dict.fromkeys(raw))


def parse(text: str, source: str, upstreams: Mapping[str, str]) -> RouteTable:
    """Validate the file text; raise RouteTableError naming the line of the first mistake."""
    document = _toml(text, source)
    lines = _Lines(text)
    for key in document:
        if key not in _TOP_KEYS:
            raise RouteTableError(source, lines.top(key), f"unknown section {key!r}")
    known = _known_upstreams(document, lines, source, upstreams)
    routes: list[Route] = []
    seen: dict[str, int | None] = {}
    for kind in ("public", "route"):
        entries = document.get(kind, [])
        if not isinstance(entries, list):
            raise RouteTableError(source, lines.top(kind), f"use [[{kind}]] tables")
        for index, entry in enumerate(entries):
            routes.append(_route(kind, index, entry, lines, source, known, seen))
    return RouteTable(routes, known, source)


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_POSITION.search(str(exc))
        raise RouteTableError(
            source, int(found.group(1)) if found else None, f"TOML syntax error: {exc}"
        ) from None


def _known_upstreams(
    document: Mapping[str, Any], lines: _Lines, source: str, configured: Mapping[str, str]
) -> dict[str, str]:
    """The configured upstreams and the file's `[upstreams]`, each an http(s) base URL."""
    known = dict(configured)
    extra = document.get("upstreams", {})
    if not isinstance(extra, dict):
        raise RouteTableError(source, lines.top("upstreams"), "[upstreams] must be a table")
    for name, url in extra.items():
        parts = urlsplit(url) if isinstance(url, str) else None
        if not _UPSTREAM_NAME.match(name) or parts is None:
            raise RouteTableError(source, lines.top(name), f"bad upstream {name!r}")
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise RouteTableError(
                source, lines.top(name), f"upstream {name!r} must be an http(s) base URL"
            )
        known[name] = url.rstrip("/")
    return known


def _route(
    kind: str,
    index: int,
    entry: Any,
    lines: _Lines,
    source: str,
    known: Mapping[str, str],
    seen: dict[str, int | None],
) -> Route:
    """The `index`-th `[[public]]` or `[[route]]` entry; `seen` holds the prefixes before it."""
    line, _ = lines.table(kind, index)
    fail = functools.partial(_entry_error, lines, source, (kind, index))
    if not isinstance(entry, dict):
        raise fail(f"a [[{kind}]] entry must be a table")
    allowed = _PUBLIC_KEYS if kind == "public" else _ROUTE_KEYS
    for key in entry:
        if key not in allowed:
            raise fail(f"unknown key {key!r} in a [[{kind}]] entry", key)
    prefix = _normalise_prefix(entry.get("prefix"))
    if prefix is None:
        raise fail(
            "prefix must be a path starting with '/', without '//', dot segments, "
            "'%', '?', '#', '*' or spaces",
            "prefix",
        )
    if prefix in seen:
        raise fail(f"duplicate prefix {prefix!r} (first at line {seen[prefix]})", "prefix")
    seen[prefix] = line
    upstream = entry.get("upstream")
    if upstream not in known:
        raise fail(
            f"unknown upstream {upstream!r}; known: {', '.join(sorted(known))}",
            "upstream",
        )
    if kind == "public":
        all_methods = dict.fromkeys((*METHODS, "OPTIONS"), ())
        max_body = entry.get("max_body")
        if max_body is not None and (
            not isinstance(max_body, int) or isinstance(max_body, bool) or max_body < 0
        ):
            raise fail("max_body must be a whole number of bytes", "max_body")
        return Route(prefix, str(upstream), False, all_methods, line, max_body)
    return Route(prefix, str(upstream), True, _method_scopes(entry, fail), line)


def _method_scopes(
    entry: Mapping[str, Any], fail: Callable[..., RouteTableError]
) -> dict[str, tuple[str, ...]]:
    """A protected route's any-of scopes per method: `all_methods`, then `read` and `write`,
    then `methods` per method, each later one overriding; HEAD as GET unless named."""
    scopes: dict[str, tuple[str, ...]] = {}
    for key, methods in (
        ("all_methods", METHODS),
        ("read", READ_METHODS),
        ("write", WRITE_METHODS),
    ):
        if key in entry:
            listed = _scope_list(entry[key])
            if isinstance(listed, str):
                raise fail(f"{key} {listed}", key)
            scopes.update(dict.fromkeys(methods, listed))
    per_method = entry.get("methods", {})
    if not isinstance(per_method, dict):
        raise fail("methods must be a table of METHOD = [scopes]", "methods")
    for method, raw in per_method.items():
        if method not in METHODS:
            raise fail(f"bad method {method!r}; use one of {', '.join(METHODS)}", "methods")
        listed = _scope_list(raw)
        if isinstance(listed, str):
            raise fail(f"methods.{method} {listed}", "methods")
        scopes[method] = listed
    if not scopes:
        raise fail("the route names no method (give read, write, all_methods or methods)")
    if "GET" in scopes and "HEAD" not in scopes:
        scopes["HEAD"] = scopes["GET"]
    return scopes


def load(path: str | Path, settings: Settings) -> RouteTable:
    """Read and validate the route file; RouteTableError when it is missing or wrong."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RouteTableError(source, None, f"cannot read the route file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise RouteTableError(source, None, "the route file is not UTF-8") from None
    return parse(text, source, configured_upstreams(settings))

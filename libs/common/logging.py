"""JSON logs through structlog, with request context and a redaction filter.

The filter is the last line of defence: no token, secret, password, cookie or Authorization
header reaches a log line, whether it was passed as a named field or pasted into a message.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import orjson
import structlog

REDACTED = "[REDACTED]"

# Field names whose values are never logged, matched anywhere in the key.
_SECRET_KEY = re.compile(
    r"(token|secret|password|passwd|authorization|cookie|code_verifier|assertion|"
    r"private|credential|api_key|apikey|^code$|session)",
    re.IGNORECASE,
)
# Values that look like credentials wherever they appear in a string.
_SECRET_VALUE = re.compile(
    r"(eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"  # a JWS compact token
    r"|(?i:bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"  # an Authorization header value
    r"|\blc[a-z]{1,3}_[A-Za-z0-9_-]{16,}"  # our own opaque tokens and secrets
    r"|\bwhsec_[A-Za-z0-9+/=_-]{16,})"  # Standard Webhooks secrets are standard base64
)
# `password=...`, `"client_secret": "..."`: a credential-named key pasted into text with its
# value (a logged form body, query string or JSON document). The key stays, the value goes.
_SECRET_PAIR = re.compile(
    r"""(?i)(\b[a-z_]*(?:password|passwd|secret|token|code_verifier|assertion|api_?key|cookie)"""
    r"""["']?\s*[=:]\s*["']?)[^\s"'&,;]+"""
)


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return value
    if isinstance(value, str):
        value = _SECRET_VALUE.sub(REDACTED, value)
        return _SECRET_PAIR.sub(lambda m: m.group(1) + REDACTED, value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _scrub(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return value


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: blank secret-named fields and secret-shaped values."""
    for key in list(event_dict):
        if _SECRET_KEY.search(key) and key != "event":
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


# Values that are ours: validated request ids, school and client ids found in the database,
# numbers, the service's name. The access log (a line per request) scans only its other
# fields: the request's path above all.
_OWN_FIELDS = frozenset(
    {
        "event",
        "level",
        "timestamp",
        "service",
        "request_id",
        "school",
        "client_id",
        "method",
        "status",
        "duration_ms",
        "trace_id",
        "span_id",
    }
)


def _redact_access(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """redact(), less the scan of the fields the access log fills from what is ours."""
    for key in list(event_dict):
        if key in _OWN_FIELDS:
            continue
        if _SECRET_KEY.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


_access: Any = None


def access_logger() -> Any:
    """The access log's logger (made by configure_logging; a plain one before it ran)."""
    return _access if _access is not None else structlog.get_logger("access")


def add_trace_ids(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the current trace's and span's ids (with tracing on), so a log
    line leads to its trace and back."""
    from libs.common import tracing

    ids = tracing.current_ids()
    if ids is not None:
        event_dict["trace_id"], event_dict["span_id"] = ids
    return event_dict


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(
    level: str = "info", *, service: str = "connect", trace_ids: bool = False
) -> None:
    """JSON lines on stderr; stdout stays free for the CLI's `--json` answers. `trace_ids`
    (tracing on) adds the current trace and span ids to every line."""
    numeric = logging.getLevelName(level.upper())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *([add_trace_ids] if trace_ids else []),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
        structlog.processors.JSONRenderer(serializer=_dumps),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # The access log: the same lines, made with less work (a line per request).
    global _access
    _access = structlog.wrap_logger(
        structlog.WriteLogger(file=sys.stderr),
        processors=[
            structlog.contextvars.merge_contextvars,
            *([add_trace_ids] if trace_ids else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_access,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
    ).bind()
    # Libraries that log through the standard module (aiohttp's access log among them) go
    # through the same redaction and renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact,
                structlog.processors.JSONRenderer(serializer=_dumps),
            ],
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)

"""OpenTelemetry tracing, off unless configured (config.Observability).

Off, nothing is instrumented and nothing runs per request: no middleware, no patched client,
no span objects. On (:func:`setup`, once per process before the application is made):

- every aiohttp application gets the server middleware (a SERVER span per request, the
  caller's `traceparent` as its parent), every aiohttp ClientSession made afterwards sends
  the current span as `traceparent`, and asyncpg and redis-py calls are spans;
- the gateway's own clients (http1_pool.py, redis_pipeline.py) call :func:`client_span`;
- spans are sent by the OTLP/HTTP exporter (its own OTEL_EXPORTER_OTLP_* variables) or
  printed one JSON object a line on stdout (`OTEL_TRACES_EXPORTER=console`).

Only requests start traces: a database or Redis call outside one (a background loop's
XREAD every second, a probe's ping) is not recorded, or every trace store would fill with
them. URLs lose their query strings before any exporter sees them: a query may carry a
signature, a code or a state.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from libs.common.config import Observability

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import Span
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import Link, SpanKind
    from opentelemetry.util.types import Attributes

# Read by the few places that add spans by hand: a module attribute, so a disabled process
# pays one lookup per call there and nothing else.
ENABLED = False
_provider: SdkTracerProvider | None = None

# Span attributes that hold a URL or its query (old and new HTTP semantic conventions).
_URL_ATTRIBUTES = ("http.url", "url.full", "http.target")
# Probes and scrapes: not worth a trace each, every few seconds.
_UNTRACED_PATHS = "/healthz$,/readyz$,/metrics$"


def setup(observability: Observability, service: str) -> None:
    """Install the tracer provider and the instrumentations; a no-op when tracing is off."""
    global ENABLED, _provider
    if not observability.tracing or ENABLED:
        return
    from opentelemetry import trace
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
        SpanExporter,
    )

    provider = TracerProvider(
        # The service's own name wins over a shared OTEL_SERVICE_NAME: four services, four names.
        resource=Resource.create(
            {"service.name": service, "service.namespace": "loopwise-connect"}
        ),
        sampler=_sampler(observability.sample_ratio),
    )
    provider.add_span_processor(_query_scrubber())
    exporter: SpanExporter
    processor: SpanProcessor
    if observability.exporter == "console":
        exporter = ConsoleSpanExporter(
            out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
        processor = SimpleSpanProcessor(exporter)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter())
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)

    # The server instrumentation reads its exclusions from the environment when instrumenting.
    os.environ.setdefault("OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS", _UNTRACED_PATHS)
    AioHttpServerInstrumentor().instrument(tracer_provider=provider)
    AioHttpClientInstrumentor().instrument(tracer_provider=provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument(tracer_provider=provider)
    _provider = provider
    ENABLED = True


def shutdown() -> None:
    """Send what is still buffered (at the end of `serve`)."""
    if _provider is not None:
        _provider.shutdown()


def _sampler(ratio: float) -> Any:
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )
    from opentelemetry.trace import SpanKind

    ratio_sampler = TraceIdRatioBased(ratio)

    class RequestRoots(Sampler):
        """A trace starts at a request (a SERVER span), never at a background call."""

        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            if kind is not SpanKind.SERVER:
                return SamplingResult(Decision.DROP)
            return ratio_sampler.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"RequestRoots({ratio})"

    return ParentBased(root=RequestRoots())


def _query_scrubber() -> Any:
    from opentelemetry.sdk.trace import SpanProcessor

    class QueryScrubber(SpanProcessor):
        """Cuts the query off every URL attribute when a span starts (the instrumentations
        set them then), before any exporter can see them."""

        def on_start(self, span: Span, parent_context: Context | None = None) -> None:
            attributes = span.attributes or {}
            for key in _URL_ATTRIBUTES:
                value = attributes.get(key)
                if isinstance(value, str) and "?" in value:
                    span.set_attribute(key, value.split("?", 1)[0])
            if attributes.get("url.query"):
                span.set_attribute("url.query", "")

    return QueryScrubber()


@contextmanager
def client_span(
    name: str, headers: MutableMapping[str, str], attributes: dict[str, str | int]
) -> Iterator[Any]:
    """A CLIENT span around a call made by one of our own clients, its context written into
    `headers` as `traceparent` (replacing any the caller sent: the upstream's parent is this
    span). Call only when :data:`ENABLED`."""
    from opentelemetry import propagate, trace

    tracer = trace.get_tracer("loopwise-connect")
    with tracer.start_as_current_span(
        name, kind=trace.SpanKind.CLIENT, attributes=attributes
    ) as span:
        propagate.inject(headers)
        yield span


@contextmanager
def redis_span(command: str, purpose: str) -> Iterator[Any]:
    """A CLIENT span around one command of our own Redis client (the command's name only,
    never its keys or values, as the redis-py instrumentation records them)."""
    from opentelemetry import trace

    tracer = trace.get_tracer("loopwise-connect")
    with tracer.start_as_current_span(
        f"{command} {purpose}",
        kind=trace.SpanKind.CLIENT,
        attributes={"db.system": "redis", "db.operation.name": command},
    ) as span:
        yield span


def answered(span: Any, status: int) -> None:
    """Record an upstream's answer on a client span (an error from 500 up, as the
    instrumentations mark theirs)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def current_ids() -> tuple[str, str] | None:
    """The current trace and span ids in hex, or None outside a recorded span."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def rename_request_span(name: str) -> None:
    """Name the current request's span (the gateway's catch-all route says nothing)."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.update_name(name)

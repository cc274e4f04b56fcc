"""A tiny OTLP/HTTP trace collector for development and the tests: `POST /v1/traces` (protobuf,
as the services' exporter sends it), every span kept in memory, each trace printable as a tree.

    python -m services.dev.collector --port 4318
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 make dev

prints each trace once no span of it arrived for a second. Not a production collector: it
keeps everything and answers anyone on the address it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a trace's root
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def decode(body: bytes) -> list[Span]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name", "?"))
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(
                    Span(
                        service=service,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=KINDS.get(s.kind, str(s.kind)),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                    )
                )
    return spans


class Collector:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.bodies: list[bytes] = []
        self.last_seen: dict[str, float] = {}
        self.changed = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._receive)
        return app

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        received = decode(body)
        self.spans.extend(received)
        now = time.monotonic()
        for span in received:
            self.last_seen[span.trace_id] = now
        self.changed.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(self, trace_id: str, done: Any, timeout: float = 20) -> list[Span]:
        """The trace's spans once `done(spans)` holds; TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            while True:
                spans = self.trace(trace_id)
                if done(spans):
                    return spans
                self.changed.clear()
                await self.changed.wait()


def tree(spans: list[Span]) -> str:
    """One trace as an indented tree, children in start order."""
    children: dict[str, list[Span]] = defaultdict(list)
    ids = {s.span_id for s in spans}
    roots = []
    for s in sorted(spans, key=lambda s: s.start_ns):
        if s.parent_id and s.parent_id in ids:
            children[s.parent_id].append(s)
        else:
            roots.append(s)
    lines: list[str] = []

    def walk(span: Span, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        detail = span.attributes.get("db.statement") or span.attributes.get("db.query.text")
        about = f"  [{' '.join(str(detail).split())[:60]}]" if detail else ""
        lines.append(
            f"{prefix}{branch}{span.service}: {span.name} ({span.kind}, {span.ms:.1f} ms){about}"
        )
        below = children.get(span.span_id, [])
        deeper = prefix + ("" if top else ("   " if last else "│  "))
        for i, child in enumerate(below):
            walk(child, deeper, i == len(below) - 1, False)

    for root in roots:
        if root.parent_id:
            lines.append(f"(parent {root.parent_id} not received)")
        walk(root, "", True, True)
    return "\n".join(lines)


async def _serve(host: str, port: int, quiet: float) -> None:
    collector = Collector()
    runner = web.AppRunner(collector.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"collecting OTLP/HTTP traces on http://{host}:{port}/v1/traces", flush=True)
    printed: set[str] = set()
    while True:
        await asyncio.sleep(quiet / 2)
        now = time.monotonic()
        for trace_id, seen in list(collector.last_seen.items()):
            if trace_id not in printed and now - seen >= quiet:
                printed.add(trace_id)
                print(f"trace {trace_id}\n{tree(collector.trace(trace_id))}\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--quiet", type=float, default=1.0, help="seconds without a new span")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.quiet))


if __name__ == "__main__":
    main()

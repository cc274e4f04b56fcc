"""One delivery attempt: the Standard Webhooks headers, one POST from the egress session, and
its result.

No redirect is followed, the answer is read up to a cap and only an excerpt kept, and every
failure (refused by the SSRF guard, timed out, connection failed) is named in the result rather
than raised, so the sender records it as an attempt.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import aiohttp
from yarl import URL

from services.webhooks import signing, ssrf
from services.webhooks.delivery.retry import parse_retry_after
from services.webhooks.store.queue import Claimed

USER_AGENT = "Loopwise-Connect-Webhooks/1"
# Read at most this much of an answer (enough for keep-alive on ordinary answers); only the
# excerpt is stored.
MAX_RESPONSE_BYTES = 64 * 1024
EXCERPT_BYTES = 200


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status: int | None
    latency_ms: int
    excerpt: str | None
    error: str | None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def signed_headers(cache: signing.KeyCache, c: Claimed) -> dict[str, str]:
    """The request's headers, signed with every live secret of the subscription."""
    keys = [cache.key(c.subscription_id, c.secret_enc)]
    if c.previous_secret_enc is not None:
        keys.append(cache.key(c.subscription_id, c.previous_secret_enc))
    timestamp = int(time.time())
    return {
        "webhook-id": c.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signing.signature_header(keys, c.event_id, timestamp, c.body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < cap:
        chunk = await response.content.read(cap - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _excerpt(raw: bytes) -> str | None:
    if not raw:
        return None
    # PostgreSQL text cannot hold NUL.
    return raw[:EXCERPT_BYTES].decode("utf-8", "replace").replace("\x00", "\ufffd")


def _pinned(url: URL, address: str) -> URL:
    """The URL with its host replaced by the checked address (for proxied requests)."""
    return url.with_host(address)


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    policy: ssrf.AddressPolicy,
    resolver: ssrf.GuardedResolver,
    proxy: str | None = None,
    family: socket.AddressFamily = socket.AF_UNSPEC,
) -> AttemptResult:
    """One POST: no redirects followed, the answer read up to a cap, every failure named."""
    started = time.perf_counter()

    def failed(error: str) -> AttemptResult:
        return AttemptResult(None, int((time.perf_counter() - started) * 1000), None, error)

    try:
        # The URL as aiohttp reads it, host folded as its connector dials it.
        found = ssrf.target(url)
        # aiohttp connects to address literals without asking the resolver: check them here.
        ssrf.check_target(found, policy)
        target = found.url
        extra: dict[str, str] = {}
        if proxy is not None:
            # The proxy would resolve the name itself, after our check: hand it the address
            # we checked, and keep the name for Host and TLS.
            address = found.host if found.address is not None else None
            address = address or await resolver.resolve_one(found.host, found.port, family)
            target = _pinned(found.url, address)
            headers = {**headers, "Host": found.url.host_port_subcomponent or found.host}
            if found.url.scheme == "https":
                extra["server_hostname"] = found.host.rstrip(".")
        async with session.post(
            target,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
            proxy=proxy,
            **extra,  # type: ignore[arg-type]
        ) as response:
            raw = await _read_capped(response, MAX_RESPONSE_BYTES)
            status = response.status
            retry_after = (
                parse_retry_after(response.headers.get("Retry-After"))
                if status in (429, 503)
                else None
            )
    except ssrf.UnsafeUrl as exc:
        # Stored before the checks it now fails (they only grow stricter): refused, never sent.
        return failed(f"refused: {exc}")
    except TimeoutError:
        return failed(f"timed out after {timeout:g} s")
    except ssrf.BlockedAddress as exc:
        return failed(str(exc))
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ssrf.BlockedAddress):
            return failed(str(exc.os_error))
        return failed(f"connection failed: {exc.os_error.strerror or exc}")
    except aiohttp.ClientError as exc:
        return failed(f"{type(exc).__name__}: {exc}"[:300])
    except OSError as exc:
        # Resolving the name to pin for the proxy failed.
        return failed(f"connection failed: {exc.strerror or exc}")
    latency = int((time.perf_counter() - started) * 1000)
    if 200 <= status < 300:
        error = None
    elif 300 <= status < 400:
        error = "redirects are not followed"
    else:
        error = f"HTTP {status}"
    return AttemptResult(status, latency, _excerpt(raw), error, retry_after)

"""Test helpers: free ports, real servers on real sockets, and a resolver for *.localhost.

Python does not resolve `demo.localhost` the way curl and browsers do, so clients built here use
`LocalhostResolver`, which maps every `*.localhost` name to 127.0.0.1 and leaves the URL (and
so the Host header) exactly as a user's browser would send it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalhostResolver(AbstractResolver):
    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        local = host == "localhost" or host.endswith(".localhost")
        address = "127.0.0.1" if local else host
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def client_session(**kwargs: Any) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=LocalhostResolver(), force_close=False)
    return aiohttp.ClientSession(connector=connector, **kwargs)


@asynccontextmanager
async def running(app: web.Application, port: int) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1:port for the block; yields the base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)

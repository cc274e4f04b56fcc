"""Identity's memory under a sign-in burst: what deploy/k8s/base/identity.yaml's limit is set from.

    .venv/bin/python deploy/k8s/tools/identity-memory.py [--concurrency 48] [--rounds 4]

Starts a real identity process (`loopwise-connect serve identity`) on a database of its own
(dropped afterwards) and the local PostgreSQL and Redis (DATABASE_SERVER_URL, REDIS_URL), makes
a school and a user with the CLI, then signs in `concurrency` browsers at once, `rounds` times:
each loads the sign-in form and posts the password, an argon2 verification (64 MiB each,
PASSWORD_HASH_CONCURRENCY at once). Prints the process's resident memory before, and its peak
(VmHWM), in MiB, as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parents[3]
CLI = str(Path(sys.executable).with_name("loopwise-connect"))
PASSWORD = "correct horse battery staple"
USERS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


async def _sign_in(http: aiohttp.ClientSession, base: str, host: str, n: int) -> int:
    headers = {"Host": host}
    async with http.get(f"{base}/account/login", headers=headers) as resp:
        page = await resp.text()
        cookies = "; ".join(f"{c.key}={c.value}" for c in resp.cookies.values())
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
    fields.update(email=f"user{n % USERS}@memory.example.com", password=PASSWORD)
    async with http.post(
        f"{base}/account/login",
        data=fields,
        headers={**headers, "Cookie": cookies, "Origin": f"http://{host}"},
        allow_redirects=False,
    ) as resp:
        await resp.read()
        return resp.status


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    server = os.environ.get("DATABASE_SERVER_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database = f"connect_identity_memory_{secrets.token_hex(4)}"
    port = _free_port()
    host = f"memory.localhost:{port}"
    env = {
        **os.environ,
        "CONNECT_ENV": "test",
        "DATABASE_URL": server.rsplit("/", 1)[0] + "/" + database,
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "REDIS_KEY_PREFIX": f"{database}:",
        "KEY_ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "SECRET_PEPPER": base64.b64encode(secrets.token_bytes(32)).decode(),
        "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{port}",
        "PLATFORM_URL": f"http://localhost:{port}",
        "IDENTITY_PORT": str(port),
        "LOG_LEVEL": "warning",
    }

    def cli(*argv: str) -> None:
        subprocess.run([CLI, *argv], env=env, check=True, capture_output=True, cwd=ROOT)

    cli("migrate")
    proc: asyncio.subprocess.Process | None = None
    try:
        cli("schools", "create", "--subdomain", "memory", "--name", "Memory")
        # Several accounts, so the per-account sign-in throttle leaves more of the burst to hash.
        for n in range(USERS):
            cli(
                "users", "create", "--school", "memory",
                "--email", f"user{n}@memory.example.com", "--password", PASSWORD,
            )  # fmt: skip
        proc = await asyncio.create_subprocess_exec(CLI, "serve", "identity", env=env, cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        ) as http:
            for _ in range(200):
                try:
                    async with http.get(f"{base}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            # Warm: one sign-in loads the pages and the hasher.
            first = await _sign_in(http, base, host, 0)
            before = _mib(proc.pid, "VmRSS")
            statuses: dict[int, int] = {}
            for _ in range(args.rounds):
                done = await asyncio.gather(
                    *(_sign_in(http, base, host, n) for n in range(args.concurrency))
                )
                for status in done:
                    statuses[status] = statuses.get(status, 0) + 1
            result: dict[str, Any] = {
                "first_sign_in": first,
                "sign_ins": statuses,
                "concurrency": args.concurrency,
                "rss_before_mib": round(before, 1),
                "rss_after_mib": round(_mib(proc.pid, "VmRSS"), 1),
                "rss_peak_mib": round(_mib(proc.pid, "VmHWM"), 1),
            }
        print(json.dumps(result))
    finally:
        if proc is not None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

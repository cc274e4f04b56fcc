"""The node-oidc-provider peer (../shared/peers/node-oidc), side by side in the full run.

The peer folder is read-only, so it is copied to bench/.peer-work (git-ignored) and `npm ci`
runs there (skipped when the copy's lock file is unchanged and node_modules exists). Its
server.mjs is started with the Redis adapter and RS256, as its README measured; its own
mint_refresh.mjs mints the refresh pool through the full authorization code + PKCE flow (one
user and grant per token, about 140 flows/s here, which is why the pool is small and made while
our system starts). Load comes from the same wrk scripts as ours: the same requests as the
peer's wrk/*.lua, with the window timed in Lua.

Anything that fails here makes the peer's rows "not run: <why>", never the bench.
"""

from __future__ import annotations

import base64
import filecmp
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BenchError, Proc
from bench.world import ROOT

# ../shared/peers/node-oidc from the repository root, or BENCH_PEER_DIR.
PEER_SOURCE = Path(
    os.environ.get("BENCH_PEER_DIR", ROOT.parent / "shared" / "peers" / "node-oidc")
).resolve()
WORK = Path(__file__).resolve().parent / ".peer-work" / "node-oidc"

# Its README's table (2 vCPU Xeon VM, wrk -t1 -c32 -d10s, RS256, Redis adapter).
PUBLISHED = {
    "client_credentials": {"rps": 2086.8, "p50_ms": 14.31, "p99_ms": 39.26, "cpu_ms": 0.79},
    "refresh_token": {"rps": 974.0, "p50_ms": 31.74, "p99_ms": 60.11, "cpu_ms": 1.66},
}
CC_BASIC = base64.b64encode(b"bench-m2m:bench-m2m-secret-0123456789abcdef").decode()
APP_BASIC = base64.b64encode(b"bench-app:bench-app-secret-0123456789abcdef").decode()
CC_BODY = (
    "grant_type=client_credentials&scope=api%3Aread%20api%3Awrite"
    "&resource=https%3A%2F%2Fapi.bench.test%2F"
)


def published(kind: str) -> str:
    p = PUBLISHED[kind]
    return f"{p['rps']:,.0f}/s p99 {p['p99_ms']:.0f} ms"


@dataclass
class Peer:
    port: int
    log_dir: Path
    redis_url: str
    prefix: str
    proc: Proc | None = None
    pool_file: Path | None = None
    warm_file: Path | None = None
    problem: str | None = None
    node: str = "node"
    info: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(
            argv, cwd=WORK, capture_output=True, timeout=timeout, check=False, env=dict(os.environ)
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).decode(errors="replace").strip()[-400:]
            raise BenchError(f"{' '.join(argv[:2])} failed: {tail}")
        return done

    def install(self) -> None:
        if shutil.which("node") is None or shutil.which("npm") is None:
            raise BenchError("node/npm not installed")
        if not (PEER_SOURCE / "server.mjs").exists():
            raise BenchError(f"no peer at {PEER_SOURCE}")
        WORK.mkdir(parents=True, exist_ok=True)
        fresh = not (WORK / "node_modules").is_dir() or not (
            (WORK / "package-lock.json").exists()
            and filecmp.cmp(PEER_SOURCE / "package-lock.json", WORK / "package-lock.json", False)
        )
        for item in PEER_SOURCE.iterdir():
            if item.name in ("node_modules", "results"):
                continue
            if item.is_dir():
                shutil.copytree(item, WORK / item.name, dirs_exist_ok=True)
            else:
                shutil.copy2(item, WORK / item.name)
        if fresh:
            self._run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], timeout=240)
        bundled = WORK / "node_modules" / ".bin" / "node"
        self.node = str(bundled) if bundled.exists() else "node"
        version = self._run([self.node, "-v"], timeout=30).stdout.decode().strip()
        provider = self._run(
            [self.node, "-p", 'require("./node_modules/oidc-provider/package.json").version'],
            timeout=30,
        )
        self.info = {"node": version, "oidc_provider": provider.stdout.decode().strip()}

    def start(self) -> None:
        env = {
            **os.environ,
            "NODE_ENV": "production",
            "ADAPTER": "redis",
            "ALG": "RS256",
            "PORT": str(self.port),
            "REDIS_URL": self.redis_url,
            "REDIS_PREFIX": f"{self.prefix}oidc:",
        }
        self.proc = Proc(
            "node-oidc",
            [self.node, "server.mjs"],
            env,
            self.log_dir / "node-oidc.log",
            port=self.port,
            cwd=WORK,
        )
        self.proc.start()
        self.proc.wait_http("/.well-known/openid-configuration", timeout=30)

    def mint(self, pool: int, warm: int) -> None:
        """The refresh pool, through the peer's own full authorization code flow."""
        out = self.log_dir / "peer-pool.all"
        self._run([self.node, "mint_refresh.mjs", "--base", self.url, "--check"], timeout=60)
        started = time.monotonic()
        self._run(
            [
                self.node,
                "mint_refresh.mjs",
                "--base",
                self.url,
                "--n",
                str(pool + warm),
                "--concurrency",
                "32",
                "--out",
                str(out),
            ],
            timeout=600,
        )
        tokens = [t for t in out.read_text().splitlines() if t]
        out.unlink()
        self.info["minted"] = f"{len(tokens)} in {time.monotonic() - started:.0f}s"
        body = "grant_type=refresh_token&refresh_token="
        self.warm_file = self.log_dir / "peer-pool.warm"
        self.pool_file = self.log_dir / "peer-pool.txt"
        self.warm_file.write_text("".join(f"{body}{t}\n" for t in tokens[:warm]))
        self.pool_file.write_text("".join(f"{body}{t}\n" for t in tokens[warm:]))

    def prepare(self, pool: int, warm: int) -> None:
        """Install, start, check and mint; records the problem instead of raising."""
        try:
            self.install()
            self.start()
            self.mint(pool, warm)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            self.problem = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ready(self) -> bool:
        return self.problem is None and self.proc is not None and self.proc.alive()

    def stop(self) -> None:
        if self.proc is not None and self.proc.popen is not None:
            # SIGTERM: server.mjs removes its own Redis keys, then exits.
            self.proc.stop(timeout=15)
        for f in (self.pool_file, self.warm_file):
            if f is not None:
                f.unlink(missing_ok=True)

"""The token endpoint, straight at identity (as the peer is measured straight at its server):
`client_credentials`, `authorization_code` exchanges and `refresh_token` rotations, every one
fully persisted (PostgreSQL transaction, audit record on Redis) before it answers.

The refresh pool is minted through the real flow: authorization codes are stored exactly as
the authorize step stores them (bench/world.py mint_codes, as tests/token_helpers.py does)
and exchanged at the real token endpoint by wrk; the exchange run captures every answer's
refresh token (bench/lua/pool.lua), and those tokens are the refresh run's pool, each spent
once. Codes live 60 s, so each code pool is minted right before its run.

Reference figures: Keycloak's published 120 refresh grants/s per vCPU (times this machine's
cores), and the node-oidc-provider peer, measured in the full run (published figures in the
quick one).
"""

from __future__ import annotations

from pathlib import Path

from bench import peer as peer_mod
from bench.measure import Context, Measured
from bench.peer import Peer
from bench.report import Row, ratio
from bench.world import mint_codes, refresh_prefix

KEYCLOAK_PER_VCPU = 120
TOKEN_PATH = "/v1/oauth/token"


def _captured(base: Path) -> Path:
    """The per-thread capture files of a run, as one pool file."""
    pool = base.with_suffix(".pool")
    with pool.open("w") as out:
        for part in sorted(base.parent.glob(base.name + ".*")):
            if part.suffix != ".pool":
                out.write(part.read_text())
                part.unlink()
    return pool


def _lines(path: Path) -> int:
    with path.open() as fh:
        return sum(1 for line in fh if line.strip())


def _figure(m: Measured, *labels: str) -> str:
    r = m.result
    text = (
        f"{r.rps:,.0f}/s p50 {r.p50_ms:.1f} / p99 {r.p99_ms:.1f} ms, "
        f"cpu {m.cpu_ms_per_req(*labels[:1]):.2f} ms/req"
    )
    if len(labels) > 1:
        text += f" ({m.cpu_ms_per_req(*labels):.2f} with stores)"
    if r.errors:
        text += f", {r.errors} errors"
    if r.exhausted:
        text += f", pool used up at {r.window_s:.1f}s"
    if m.noisy:
        text += " (noisy)"
    return text


async def run(ctx: Context, peer: Peer | None) -> list[Row]:
    from libs.common import db

    s, plan, w = ctx.system, ctx.plan, ctx.world
    url = s.url(s.ports.identity)
    groups = {"identity": [s.pid("identity")]}
    stores = ("identity", "postgres", "redis")
    wait = 5 if plan.peer else 0
    details: dict[str, object] = {"scopes_of_codes": "openid courses:read students:read"}
    ctx.details["tokens"] = details
    form = "Content-Type: application/x-www-form-urlencoded"
    peer_live = peer is not None and peer.ready()
    peer_groups = {"node": [peer.pid]} if peer is not None and peer_live else {}

    # client_credentials --------------------------------------------------------------------
    cc_env = {
        "BENCH_METHOD": "POST",
        "BENCH_PATH": TOKEN_PATH,
        "BENCH_BODY": "grant_type=client_credentials",
        "BENCH_HOST": s.host,
        "BENCH_HEADERS": f"Authorization: {w.basic()}\n{form}",
    }
    ctx.say(f"client_credentials ({plan.token_s:g}s)")
    await ctx.wrk(
        "warm-up client_credentials",
        url,
        "static.lua",
        duration=plan.token_warmup_s,
        connections=plan.connections,
        groups=groups,
        env=cc_env,
    )
    cc = await ctx.wrk(
        "client_credentials",
        url,
        "static.lua",
        duration=plan.token_s,
        connections=plan.connections,
        groups=groups,
        env=cc_env,
        quiet_wait=wait,
    )
    ctx.say("  " + cc.line("identity"))
    peer_cc: Measured | None = None
    if peer is not None and peer_live:
        p_env = {
            "BENCH_METHOD": "POST",
            "BENCH_PATH": "/token",
            "BENCH_BODY": peer_mod.CC_BODY,
            "BENCH_HEADERS": f"Authorization: Basic {peer_mod.CC_BASIC}\n{form}",
        }
        await ctx.wrk(
            "warm-up node-oidc client_credentials",
            peer.url,
            "static.lua",
            duration=plan.token_warmup_s,
            connections=plan.connections,
            groups=peer_groups,
            env=p_env,
        )
        peer_cc = await ctx.wrk(
            "node-oidc client_credentials",
            peer.url,
            "static.lua",
            duration=plan.peer_token_s,
            connections=plan.connections,
            groups=peer_groups,
            env=p_env,
            quiet_wait=wait,
        )
        ctx.say("  " + peer_cc.line("node"))

    # authorization_code, capturing the refresh pool ----------------------------------------
    pool = await db.create_pool(s.database_url, min_size=1, max_size=2)
    code_env = {
        "BENCH_PATH": TOKEN_PATH,
        "BENCH_HOST": s.host,
        "BENCH_CAPTURE_PREFIX": refresh_prefix(w),
    }
    try:
        warm_n = 150 if plan.name == "quick" else 600
        bodies = await mint_codes(pool, s, w, warm_n)
        warm_codes = ctx.logs / "codes-warm.txt"
        warm_codes.write_text("\n".join(bodies) + "\n")
        warm_capture = ctx.logs / "refresh-warm"
        await ctx.wrk(
            "warm-up authorization_code",
            url,
            "pool.lua",
            duration=plan.token_warmup_s,
            connections=plan.connections,
            groups=groups,
            env={**code_env, "BENCH_CAPTURE_FILE": str(warm_capture)},
            args=[str(warm_codes), "1"],
        )
        warm_refresh = _captured(warm_capture)
        n_codes = min(60_000, int(cc.result.rps * plan.token_s * 1.1) + 300)
        ctx.say(f"authorization_code: {n_codes} codes stored, exchanged by wrk ({plan.token_s:g}s)")
        bodies = await mint_codes(pool, s, w, n_codes)
    finally:
        await pool.close()
    codes_file = ctx.logs / "codes.txt"
    codes_file.write_text("\n".join(bodies) + "\n")
    capture = ctx.logs / "refresh"
    code = await ctx.wrk(
        "authorization_code",
        url,
        "pool.lua",
        duration=plan.token_s,
        connections=plan.connections,
        groups=groups,
        env={**code_env, "BENCH_CAPTURE_FILE": str(capture)},
        args=[str(codes_file), "1"],
        quiet_wait=wait,
    )
    ctx.say("  " + code.line("identity"))
    warm_codes.unlink()
    refresh_pool = _captured(capture)
    pool_size = _lines(refresh_pool)
    # A refresh does more than a client_credentials grant: a pool for the cc rate over the
    # whole run is enough. Short of that, more codes are exchanged (not measured) to fill it.
    target = min(60_000, int(cc.result.rps * plan.token_s * 0.8))
    if plan.refresh_topup and pool_size < target and code.result.rps > 0:
        extra = target - pool_size
        seconds = min(60.0, extra / code.result.rps + 2)
        ctx.say(f"minting {extra} more refresh tokens the same way (not measured)")
        pool = await db.create_pool(s.database_url, min_size=1, max_size=2)
        try:
            bodies = await mint_codes(pool, s, w, extra)
        finally:
            await pool.close()
        codes_file.write_text("\n".join(bodies) + "\n")
        topup = ctx.logs / "refresh-topup"
        await ctx.wrk(
            "minting refresh tokens",
            url,
            "pool.lua",
            duration=seconds,
            connections=plan.connections,
            groups=groups,
            env={**code_env, "BENCH_CAPTURE_FILE": str(topup)},
            args=[str(codes_file), "1"],
        )
        codes_file.unlink()
        more = _captured(topup)
        with refresh_pool.open("a") as out:
            out.write(more.read_text())
        more.unlink()
        pool_size = _lines(refresh_pool)
    details["refresh_pool"] = pool_size

    # refresh_token -------------------------------------------------------------------------
    ctx.say(f"refresh_token: {pool_size} refresh tokens from those exchanges, each spent once")
    refresh_env = {"BENCH_PATH": TOKEN_PATH, "BENCH_HOST": s.host}
    if _lines(warm_refresh):
        await ctx.wrk(
            "warm-up refresh_token",
            url,
            "pool.lua",
            duration=plan.token_warmup_s,
            connections=plan.connections,
            groups=groups,
            env=refresh_env,
            args=[str(warm_refresh), "1"],
        )
    refresh = await ctx.wrk(
        "refresh_token",
        url,
        "pool.lua",
        duration=plan.token_s,
        connections=plan.connections,
        groups=groups,
        env=refresh_env,
        args=[str(refresh_pool), "1"],
        quiet_wait=wait,
    )
    ctx.say("  " + refresh.line("identity"))
    refresh_pool.unlink()
    warm_refresh.unlink()
    peer_refresh: Measured | None = None
    if peer is not None and peer_live and peer.pool_file is not None:
        p_env = {
            "BENCH_PATH": "/token",
            "BENCH_HEADERS": f"Authorization: Basic {peer_mod.APP_BASIC}",
        }
        assert peer.warm_file is not None
        await ctx.wrk(
            "warm-up node-oidc refresh_token",
            peer.url,
            "pool.lua",
            duration=plan.token_warmup_s,
            connections=plan.connections,
            groups=peer_groups,
            env=p_env,
            args=[str(peer.warm_file), "1"],
        )
        peer_refresh = await ctx.wrk(
            "node-oidc refresh_token",
            peer.url,
            "pool.lua",
            duration=plan.peer_token_s,
            connections=plan.connections,
            groups=peer_groups,
            env=p_env,
            args=[str(peer.pool_file), "1"],
            quiet_wait=wait,
        )
        ctx.say("  " + peer_refresh.line("node"))

    details["runs"] = {
        "client_credentials": cc.as_dict(),
        "authorization_code": code.as_dict(),
        "refresh_token": refresh.as_dict(),
        "node_oidc_client_credentials": peer_cc.as_dict() if peer_cc else None,
        "node_oidc_refresh_token": peer_refresh.as_dict() if peer_refresh else None,
        "node_oidc": peer.info if peer else None,
        "node_oidc_problem": peer.problem if peer else "not run in the quick plan",
    }

    keycloak = KEYCLOAK_PER_VCPU * ctx.cores
    kc_text = f"Keycloak {keycloak}/s (published {KEYCLOAK_PER_VCPU}/vCPU × {ctx.cores})"

    def peer_text(m: Measured | None, kind: str) -> tuple[str, float]:
        pub = peer_mod.PUBLISHED[kind]["rps"]
        if m is not None:
            return f"node-oidc {_figure(m, 'node', 'redis')} (RS256, Redis)", m.result.rps
        if peer is None:
            return f"node-oidc {peer_mod.published(kind)} (published, not run)", pub
        why = peer.problem or "peer not ready"
        return f"node-oidc not run: {why}; published {peer_mod.published(kind)}", pub

    rows = []
    p_text, p_rps = peer_text(peer_refresh, "refresh_token")
    rps = refresh.result.rps
    rows.append(
        Row(
            "token endpoint: refresh_token",
            _figure(refresh, *stores),
            f"{p_text}; {kc_text}",
            f"{ratio(rps, p_rps)} node-oidc, {ratio(rps, keycloak)} Keycloak",
            "≥ 1,000/s",
            _verdict(rps >= 1000, refresh),
            {"rps": rps, "peer_rps": p_rps, "keycloak_rps": keycloak},
        )
    )
    rows.append(
        Row(
            "token endpoint: authorization_code",
            _figure(code, *stores) + " (incl. RS256 ID token)",
            f"none; {kc_text} (refresh figure)",
            ratio(code.result.rps, keycloak) + " Keycloak",
            "— (reported)",
            "info" if not code.result.errors else f"info ({code.result.errors} errors)",
            {"rps": code.result.rps, "keycloak_rps": keycloak},
        )
    )
    p_text, p_rps = peer_text(peer_cc, "client_credentials")
    rows.append(
        Row(
            "client credentials",
            _figure(cc, *stores),
            f"{p_text}; {kc_text}",
            f"{ratio(cc.result.rps, p_rps)} node-oidc, {ratio(cc.result.rps, keycloak)} Keycloak",
            "≥ 2,000/s",
            _verdict(cc.result.rps >= 2000, cc),
            {"rps": cc.result.rps, "peer_rps": p_rps, "keycloak_rps": keycloak},
        )
    )
    return rows


def _verdict(met: bool, m: Measured) -> str:
    text = "met" if met else "NOT MET"
    if m.result.errors:
        text += f" ({m.result.errors} errors)"
    return text

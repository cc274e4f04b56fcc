"""Token validation, in process: microseconds per access-token check in the gateway's own
verifier (services/gateway/validation.py TokenVerifier over libs/common/jwt.py), with the
gateway's JWKS cache (fetched from the running identity) and client directory (the bench
database), against one raw ES256 signature verification with `cryptography` (the floor).

Tokens are minted the way identity mints them (its KeyRing, claims and signer), each distinct.
Cold: the first time the verifier sees a token (signature, claims, school, client). Warm: the
same token again (the verification cache). Timed with time.perf_counter around each call.
"""

from __future__ import annotations

import base64
import statistics
import time
import uuid
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from bench.measure import Context
from bench.report import Row, ratio

# Tokens per chunk of the alternating measurements.
CHUNK = 250


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_us": statistics.median(ordered),
        "mean_us": statistics.fmean(ordered),
        "p90_us": ordered[int(len(ordered) * 0.9)],
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


async def run(ctx: Context) -> list[Row]:
    import aiohttp
    from joserfc import jws

    from libs.common import db
    from libs.common.config import load_settings
    from services.gateway.directory import Directory
    from services.gateway.jwks import JwksCache
    from services.gateway.validation import TokenVerifier
    from services.identity import keys, minting, store
    from services.identity.schools import Issuer

    s, w, plan = ctx.system, ctx.world, ctx.plan
    settings = load_settings(s.env)
    pool = await db.create_pool(s.database_url, min_size=1, max_size=2)
    http = aiohttp.ClientSession()
    try:
        school = await store.school_by_id(pool, w.school_id)
        assert school is not None
        issuer_url = settings.urls.school_origin(school.subdomain)
        signer = await keys.KeyRing(pool, settings).signer(school.id, keys.ACCESS_TOKEN_ALG)
        issuer = Issuer(school, issuer_url)

        def mint() -> str:
            claims = minting.access_token_claims(
                settings,
                issuer=issuer,
                school=school,
                client_id=w.app_id,
                subject=str(w.user_ids[0]),
                scopes=["courses:read", "students:read"],
                audience=issuer_url,
                grant_id=uuid.uuid4(),
                auth_time=None,
            )
            return minting.sign_access_token(signer, claims)

        async def fetch(iss: str) -> dict[str, Any]:
            # As the gateway fetches it: identity's JWKS for the issuer's Host.
            async with http.get(
                s.url(s.ports.identity) + "/v1/oauth/jwks", headers={"Host": s.host}
            ) as resp:
                document: dict[str, Any] = orjson.loads(await resp.read())
                return document

        n = plan.validation_tokens
        ctx.say(f"token validation: {n} distinct tokens × {plan.validation_rounds} rounds")
        jwks = JwksCache(fetch)
        directory = Directory(pool)
        verifier = TokenVerifier(
            settings, jwks, directory, cache_ttl=settings.gateway.token_cache_ttl
        )
        # Load the JWKS and the client row once, as a running gateway has them.
        await verifier.verify(mint(), school.id, school.subdomain)
        key = (await jwks.find(issuer_url, school.id, signer.kid)) or None
        assert key is not None
        public = key.key.get_op_key("verify")
        assert isinstance(public, ec.EllipticCurvePublicKey)
        algorithm = ec.ECDSA(hashes.SHA256())

        cold: list[float] = []
        warm: list[float] = []
        floor: list[float] = []
        floor_decoding: list[float] = []
        joserfc: list[float] = []
        perf = time.perf_counter
        for _ in range(plan.validation_rounds):
            batch = [mint() for _ in range(n)]
            verifier.forget()
            # In chunks, each measurement in a tight loop of its own, the chunks alternating:
            # a drift of the machine's speed falls on all of them alike, and no measurement
            # pays for the others' code in its caches.
            for start in range(0, n, CHUNK):
                chunk = batch[start : start + CHUNK]
                for token in chunk:
                    head, payload, sig = token.split(".")
                    raw = _b64(sig)
                    der = encode_dss_signature(
                        int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
                    )
                    signing_input = f"{head}.{payload}".encode()
                    t0 = perf()
                    public.verify(der, signing_input, algorithm)
                    floor.append((perf() - t0) * 1e6)
                for token in chunk:
                    # The same, with what any verifier must do first: split, base64, DER.
                    t0 = perf()
                    head, payload, sig = token.split(".")
                    raw = _b64(sig)
                    der = encode_dss_signature(
                        int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
                    )
                    public.verify(der, f"{head}.{payload}".encode(), algorithm)
                    floor_decoding.append((perf() - t0) * 1e6)
                for token in chunk:
                    t0 = perf()
                    jws.deserialize_compact(token, key.key, algorithms=["ES256"])
                    joserfc.append((perf() - t0) * 1e6)
                for token in chunk:
                    t0 = perf()
                    await verifier.verify(token, school.id, school.subdomain)
                    cold.append((perf() - t0) * 1e6)
            for token in batch:
                t0 = perf()
                await verifier.verify(token, school.id, school.subdomain)
                warm.append((perf() - t0) * 1e6)
        await jwks.close()
    finally:
        await http.close()
        await pool.close()

    c, wm, f, j = _stats(cold), _stats(warm), _stats(floor), _stats(joserfc)
    fd = _stats(floor_decoding)
    ctx.details["validation"] = {
        "cold": c,
        "warm": wm,
        "floor_cryptography_es256_verify": f,
        "floor_with_split_base64_der": fd,
        "joserfc_deserialize_compact": j,
        "tokens": n,
        "rounds": plan.validation_rounds,
    }
    ctx.say(
        f"  cold {c['median_us']:.1f} µs, warm {wm['median_us']:.1f} µs, "
        f"floor {f['median_us']:.1f} µs ({fd['median_us']:.1f} with decoding), "
        f"joserfc alone {j['median_us']:.1f} µs (medians)"
    )
    cold_ratio = c["median_us"] / f["median_us"]
    return [
        Row(
            "token validation: cold",
            f"{c['median_us']:.1f} µs median (mean {c['mean_us']:.1f}, p99 {c['p99_us']:.0f}); "
            f"joserfc's verify {j['median_us']:.1f} µs",
            f"raw ES256 verify (cryptography) {f['median_us']:.1f} µs "
            f"({fd['median_us']:.1f} with split, base64 and DER)",
            ratio(c["median_us"], f["median_us"]),
            "≤ 1.5× floor",
            "met" if cold_ratio <= 1.5 else "NOT MET",
            {"cold_us": c["median_us"], "floor_us": f["median_us"], "ratio": cold_ratio},
        ),
        Row(
            "token validation: warm",
            f"{wm['median_us']:.1f} µs median (cache hit)",
            f"raw ES256 verify {f['median_us']:.1f} µs",
            ratio(wm["median_us"], f["median_us"]),
            "— (reported)",
            "info",
            {"warm_us": wm["median_us"], "floor_us": f["median_us"]},
        ),
    ]

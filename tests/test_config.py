"""Configuration fails fast, names the bad variable, and maps Hosts to schools exactly."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import secrets
import sys
from pathlib import Path

import aiohttp
import pytest

from libs.common import redis_client
from libs.common.config import SECRETS_OF, ConfigError, PublicUrls, Settings, load_settings
from tests.support import client_session, free_port, kill_process

CLI = str(Path(sys.executable).with_name("loopwise-connect"))


def _key(size: int = 32) -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(size)).decode()


def _production_env() -> dict[str, str]:
    """A complete, valid production environment: each test spoils exactly one variable."""
    return {
        "CONNECT_ENV": "production",
        "DATABASE_URL": "postgresql://connect@db.internal:5432/connect",
        "REDIS_URL": "rediss://cache.internal:6380/0",
        "KEY_ENCRYPTION_KEY": _key(),
        "SECRET_PEPPER": _key(),
        "INTERNAL_TOKEN": secrets.token_urlsafe(32),
        "PUBLIC_URL_TEMPLATE": "https://{school}.loopwise.com",
        "PLATFORM_URL": "https://loopwise.com",
        "IDENTITY_PORT": "8081",
        "LOG_LEVEL": "info",
        "TRUST_FORWARDED_HOST": "true",
    }


def test_valid_production_env_loads() -> None:
    """The baseline the failure cases spoil is itself accepted, with its values parsed."""
    env = _production_env()
    settings = load_settings(env)
    assert settings.environment == "production"
    assert settings.ports.identity == 8081
    assert settings.trust_forwarded_host is True
    assert settings.key_encryption_key == base64.urlsafe_b64decode(env["KEY_ENCRYPTION_KEY"])
    assert settings.urls.school_origin("demo") == "https://demo.loopwise.com"


# Standard base64 with a 32-byte value whose encoding holds `+` or `/`: the other alphabet.
_STANDARD_B64_KEY = base64.b64encode(b"\xfb\xff" * 16).decode()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://connect@db.internal/connect"),
        ("DATABASE_URL", "db.internal:5432/connect"),
        ("REDIS_URL", "http://cache.internal:6379"),
        pytest.param("REDIS_URL", "redis+cluster://", id="cluster-no-nodes"),
        pytest.param("REDIS_URL", "redis+cluster://a:7000,b", id="cluster-node-no-port"),
        pytest.param("REDIS_URL", "redis+cluster://a:7000/3", id="cluster-database"),
        pytest.param("REDIS_URL", "redis+sentinel://s1:26379", id="sentinel-no-master"),
        pytest.param("REDIS_URL", "redis+sentinel://s1:26379/main/x", id="sentinel-bad-db"),
        ("IDENTITY_PORT", "abc"),
        ("IDENTITY_PORT", "0"),
        pytest.param("KEY_ENCRYPTION_KEY", _key(16), id="kek-16-bytes"),
        pytest.param("KEY_ENCRYPTION_KEY", _key(64), id="kek-64-bytes"),
        ("KEY_ENCRYPTION_KEY", "not base64 at all!!"),
        ("KEY_ENCRYPTION_KEY", "!" * 44),
        # A valid key with a stray character must not be silently repaired.
        pytest.param("KEY_ENCRYPTION_KEY", "$" + _key(), id="kek-stray-char"),
        pytest.param("SECRET_PEPPER", _key(8), id="pepper-8-bytes"),
        pytest.param("INTERNAL_TOKEN", "short", id="internal-token-short"),
        ("PUBLIC_URL_TEMPLATE", "http://{school}.loopwise.com"),
        ("PUBLIC_URL_TEMPLATE", "https://loopwise.com"),
        ("PUBLIC_URL_TEMPLATE", "https://loopwise.com/{school}"),
        ("PLATFORM_URL", "http://loopwise.com"),
        ("LOG_LEVEL", "verbose"),
        ("TRUST_FORWARDED_HOST", "maybe"),
        ("CONNECT_ENV", "staging"),
        pytest.param("GATEWAY_REVOCATION_LEASE", "0.05", id="lease-shorter-than-a-read"),
        pytest.param("GATEWAY_REVOCATION_LEASE", "60", id="lease-holding-revokes-too-long"),
        pytest.param("GATEWAY_REVOCATION_LEASE", "-1", id="lease-negative"),
        ("ACCESS_LOG", "sometimes"),
        ("OTEL_TRACES_EXPORTER", "jaeger"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc://collector:4317"),
        pytest.param("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", id="otlp-grpc-not-installed"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_TRACES_SAMPLER_ARG", "half"),
    ],
)
def test_bad_value_names_its_variable(variable: str, value: str) -> None:
    """Each malformed variable stops loading with a ConfigError that names that variable."""
    env = {**_production_env(), variable: value}
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}:")


@pytest.mark.parametrize(
    ("url", "kind", "nodes", "master", "db"),
    [
        ("redis://cache.internal:6379/2", "single", (), "", 0),
        ("unix:///run/redis.sock", "single", (), "", 0),
        (
            "redis+cluster://r1:7000,r2:7001,[::1]:7002",
            "cluster",
            (("r1", 7000), ("r2", 7001), ("::1", 7002)),
            "",
            0,
        ),
        (
            "redis+sentinel://:pw@s1:26379,s2:26379/main/3",
            "sentinel",
            (("s1", 26379), ("s2", 26379)),
            "main",
            3,
        ),
    ],
)
def test_redis_urls_of_every_topology_load(
    url: str, kind: str, nodes: tuple[tuple[str, int], ...], master: str, db: int
) -> None:
    """One node, a Cluster (every seed kept) and Sentinel (master name, database)."""
    settings = load_settings({**_production_env(), "REDIS_URL": url})
    target = redis_client.parse(settings.redis_url)
    assert (target.kind, target.nodes, target.master, target.db) == (kind, nodes, master, db)


def test_tracing_is_off_unless_an_exporter_or_endpoint_is_given() -> None:
    assert load_settings(_production_env()).observability.exporter == "none"
    endpoint = {**_production_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert load_settings(endpoint).observability.exporter == "otlp"
    console = {**_production_env(), "OTEL_TRACES_EXPORTER": "console"}
    assert load_settings(console).observability.tracing
    disabled = {**endpoint, "OTEL_SDK_DISABLED": "true"}
    assert not load_settings(disabled).observability.tracing
    assert load_settings(_production_env()).observability.access_log
    quiet = {**_production_env(), "ACCESS_LOG": "false"}
    assert not load_settings(quiet).observability.access_log


def test_revocation_lease_may_be_turned_off() -> None:
    env = _production_env()
    assert load_settings(env).gateway.revocation_lease == 2.0
    assert load_settings({**env, "GATEWAY_REVOCATION_LEASE": "0"}).gateway.revocation_lease == 0


def test_standard_base64_alphabet_is_accepted() -> None:
    """Keys in standard base64 (`+`, `/`) decode as well as URL-safe ones."""
    assert "+" in _STANDARD_B64_KEY or "/" in _STANDARD_B64_KEY
    env = {**_production_env(), "KEY_ENCRYPTION_KEY": _STANDARD_B64_KEY}
    assert load_settings(env).key_encryption_key == b"\xfb\xff" * 16


@pytest.mark.parametrize("variable", ["KEY_ENCRYPTION_KEY", "SECRET_PEPPER", "INTERNAL_TOKEN"])
def test_production_requires_keys(variable: str, tmp_path: Path) -> None:
    """Production never falls back to generated development keys: a missing key is an error."""
    env = {**_production_env(), "CONNECT_DEV_SECRETS": str(tmp_path / "dev-secrets")}
    del env[variable]
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variable == variable
    assert not (tmp_path / "dev-secrets").exists()


@pytest.mark.parametrize("part", sorted(SECRETS_OF))
def test_each_part_holds_only_its_own_secrets(part: str) -> None:
    """In production a part starts without the secrets it does not use, and never holds one
    even where it is set (a shared environment): the gateway holds neither the key-encryption
    key nor the pepper. Reading a withheld one is an error naming it, never an empty key."""
    needs = SECRETS_OF[part]
    full = _production_env()
    bare = {
        k: v
        for k, v in full.items()
        if k not in {"KEY_ENCRYPTION_KEY", "SECRET_PEPPER", "INTERNAL_TOKEN"} - needs
    }
    for env in (bare, full):
        settings = load_settings(env, needs=needs)
        for variable, attribute in (
            ("KEY_ENCRYPTION_KEY", "key_encryption_key"),
            ("SECRET_PEPPER", "secret_pepper"),
        ):
            if variable in needs:
                assert getattr(settings, attribute) == base64.urlsafe_b64decode(full[variable])
            else:
                with pytest.raises(ConfigError) as caught:
                    getattr(settings, attribute)
                assert caught.value.variable == variable
        assert bool(settings.internal_token) == ("INTERNAL_TOKEN" in needs)
    assert "KEY_ENCRYPTION_KEY" not in SECRETS_OF["gateway"]
    assert "SECRET_PEPPER" not in SECRETS_OF["gateway"]


async def test_gateway_serves_in_production_without_key_or_pepper(
    base_env: dict[str, str], migrated: None
) -> None:
    """The real CLI's `serve gateway`, in production with neither KEY_ENCRYPTION_KEY nor
    SECRET_PEPPER in its environment (as deploy/k8s gives it), starts and turns ready."""
    port = free_port()
    env = {
        k: v
        for k, v in base_env.items()
        if k not in ("KEY_ENCRYPTION_KEY", "SECRET_PEPPER", "PUBLIC_URL_TEMPLATE", "PLATFORM_URL")
    }
    env.update(
        CONNECT_ENV="production",
        PUBLIC_URL_TEMPLATE="https://{school}.loopwise.test",
        PLATFORM_URL="https://loopwise.test",
        INTERNAL_TOKEN=secrets.token_urlsafe(32),
        PATH="/usr/bin:/bin",
    )
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "serve",
        "gateway",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    status = None
    try:
        async with client_session() as http:
            for _ in range(300):
                # A gateway that refused its configuration has exited: no need to wait on.
                if proc.returncode is not None:
                    break
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        status = resp.status
                except aiohttp.ClientConnectionError:
                    pass
                if status == 200:
                    break
                await asyncio.sleep(0.2)
    finally:
        await kill_process(proc)
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
    assert status == 200, err
    assert "KEY_ENCRYPTION_KEY" not in err and "SECRET_PEPPER" not in err, err


def test_development_allows_http_and_generates_keys_once(tmp_path: Path) -> None:
    """Outside production, http origins are fine and missing keys come from one stable file."""
    env = {
        "CONNECT_ENV": "development",
        "PUBLIC_URL_TEMPLATE": "http://{school}.localhost:8080",
        "CONNECT_DEV_SECRETS": str(tmp_path / "dev-secrets"),
    }
    first, second = load_settings(env), load_settings(env)
    assert first.key_encryption_key == second.key_encryption_key
    assert first.secret_pepper == second.secret_pepper
    assert first.key_encryption_key != first.secret_pepper
    assert len(first.key_encryption_key) == 32


def test_settings_are_frozen(settings: Settings) -> None:
    """Nobody can change configuration after start: Settings and its parts reject assignment."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.log_level = "debug"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.urls.platform_url = "http://evil.example"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.tokens.access_token_ttl = 10**9  # type: ignore[misc]


def test_secrets_stay_out_of_repr(settings: Settings) -> None:
    """Printing the settings (a traceback, a debug line) never shows the KEK, the pepper or
    the internal token."""
    text = repr(settings)
    assert settings.internal_token
    assert settings.internal_token not in text
    for secret in (settings.key_encryption_key, settings.secret_pepper):
        assert secret.hex() not in text
        assert repr(secret) not in text
        assert base64.urlsafe_b64encode(secret).decode() not in text


async def test_cli_stops_on_bad_config(base_env: dict[str, str]) -> None:
    """The real CLI exits with code 2 and names the variable before touching any store."""
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "migrate",
        env={**base_env, "IDENTITY_PORT": "abc"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, err.decode()
    assert "IDENTITY_PORT" in err.decode()
    assert out == b""


_DEV = PublicUrls("http://{school}.localhost:8080", "http://localhost:8080")
_PROD = PublicUrls("https://{school}.loopwise.com", "https://loopwise.com")


@pytest.mark.parametrize(
    ("urls", "host", "expected"),
    [
        (_DEV, "demo.localhost:8080", "demo"),
        (_DEV, "DEMO.Localhost:8080", "demo"),
        (_DEV, "localhost:8080", ""),
        (_DEV, "a.b.localhost:8080", None),
        (_DEV, ".localhost:8080", None),
        (_DEV, "demo.localhost:9090", None),
        (_DEV, "demo.localhost", None),
        (_DEV, "evil.example:8080", None),
        (_DEV, "demo.localhost:8080.evil.example", None),
        (_PROD, "demo.loopwise.com", "demo"),
        (_PROD, "loopwise.com", ""),
        (_PROD, "LoopWise.COM", ""),
        (_PROD, "evil.com", None),
        (_PROD, "evilloopwise.com", None),
        (_PROD, "demo.loopwise.com.evil.com", None),
        (_PROD, "x.demo.loopwise.com", None),
        (_PROD, "-demo.loopwise.com", None),
        (_PROD, "de_mo.loopwise.com", None),
        (_PROD, "d\udcffmo.loopwise.com", None),
        (_PROD, "dèmo.loopwise.com", None),
        (_PROD, "a" * 64 + ".loopwise.com", None),
        (_PROD, "a" * 63 + ".loopwise.com", "a" * 63),
    ],
)
def test_subdomain_of(urls: PublicUrls, host: str, expected: str | None) -> None:
    """A Host names a school (its one label), the platform (""), or nothing we serve (None)."""
    assert urls.subdomain_of(host) == expected


def test_school_origin_round_trips() -> None:
    """The origin built for a school resolves back to that school."""
    for urls in (_DEV, _PROD):
        origin = urls.school_origin("northside")
        host = origin.split("://", 1)[1]
        assert urls.subdomain_of(host) == "northside"

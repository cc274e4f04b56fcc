"""One typed, frozen configuration object, read from the environment and validated at start.

Every service and the CLI call :func:`load_settings` once; a wrong value stops the process
with a :class:`ConfigError` that names the variable and what is wrong with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

Environment = Literal["development", "test", "production"]

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/loopwise_connect"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PUBLIC_URL_TEMPLATE = "http://{school}.localhost:8080"
DEFAULT_PLATFORM_URL = "http://localhost:8080"
# Where development keeps its generated key-encryption key and secret pepper, so the CLI and
# the services of one checkout agree without any secret living in the repository.
DEV_SECRETS_FILE = Path(".data") / "dev-secrets"


class ConfigError(ValueError):
    """A configuration variable is missing or malformed."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True, slots=True)
class PublicUrls:
    """How school and platform origins are spelled, and how a Host maps back to a school."""

    school_template: str
    platform_url: str

    def school_origin(self, subdomain: str) -> str:
        return self.school_template.replace("{school}", subdomain)

    @property
    def school_host_suffix(self) -> str:
        """The Host of a school origin with the subdomain cut off: `.localhost:8080`."""
        netloc = urlsplit(self.school_template.replace("{school}", "x")).netloc
        return netloc[1:]

    @property
    def platform_host(self) -> str:
        return urlsplit(self.platform_url).netloc

    def subdomain_of(self, host: str) -> str | None:
        """The school subdomain a Host names, "" for the platform host, None for neither."""
        host = host.strip().lower()
        if host == self.platform_host.lower():
            return ""
        suffix = self.school_host_suffix.lower()
        if host.endswith(suffix):
            label = host[: -len(suffix)]
            if label and "." not in label:
                return label
        return None


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    access_token_ttl: int = 7200
    id_token_ttl: int = 3600
    authorization_code_ttl: int = 60
    refresh_token_ttl: int = 60 * 60 * 24 * 90
    # A rotated-away refresh token presented again within this many seconds is treated as a
    # concurrent retry and answered with the same successor instead of revoking the grant.
    refresh_reuse_grace: int = 10
    # How long a retired signing key stays published after it stopped signing: long enough
    # for every token it signed to expire.
    retired_key_ttl: int = 7200 + 300
    key_rotation_interval: int = 60 * 60 * 24 * 30


@dataclass(frozen=True, slots=True)
class Ports:
    identity: int = 8081
    gateway: int = 8080
    webhooks: int = 8083
    school_api: int = 8082


@dataclass(frozen=True, slots=True)
class Settings:
    environment: Environment
    database_url: str
    redis_url: str
    # Every Redis key and stream name is prefixed, so test runs (and tenants of one Redis)
    # never see each other's data.
    redis_prefix: str
    urls: PublicUrls
    key_encryption_key: bytes = field(repr=False)
    secret_pepper: bytes = field(repr=False)
    # Proves to resource services that identity headers came from a gateway (sent as
    # X-Connect-Internal-Token); resource services refuse calls without it.
    internal_token: str = field(repr=False, default="")
    log_level: str = "info"
    host: str = "127.0.0.1"
    ports: Ports = field(default_factory=Ports)
    tokens: TokenPolicy = field(default_factory=TokenPolicy)
    trust_forwarded_host: bool = False
    db_pool_min: int = 2
    db_pool_max: int = 10

    @property
    def is_development(self) -> bool:
        return self.environment != "production"

    def stream(self, name: str) -> str:
        """The full Redis name of a stream or key: `connect:events` plus the run's prefix."""
        return f"{self.redis_prefix}{name}"


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(name, f"must be true or false, got {raw!r}")


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = _text(env, name, default)
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(name, f"must be a URL with scheme {' or '.join(schemes)}")
    return value


def _key(env: Mapping[str, str], name: str, dev_value: bytes | None) -> bytes:
    raw = env.get(name, "").strip()
    if not raw:
        if dev_value is None:
            raise ConfigError(name, "is required in production (32 random bytes, base64)")
        return dev_value
    try:
        # Either alphabet, padding optional; any other character is an error, not dropped.
        padded = (raw + "=" * (-len(raw) % 4)).replace("-", "+").replace("_", "/")
        value = base64.b64decode(padded, validate=True)
    except ValueError:
        raise ConfigError(name, "must be base64 (32 random bytes)") from None
    if len(value) != 32:
        raise ConfigError(name, f"must decode to 32 bytes, got {len(value)}")
    return value


def _dev_secrets(path: Path) -> tuple[bytes, bytes]:
    """Development's key-encryption key and pepper, generated once per checkout."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(64))
    data = path.read_bytes()
    if len(data) != 64:
        raise ConfigError("KEY_ENCRYPTION_KEY", f"{path} is damaged; delete it to start afresh")
    return data[:32], data[32:]


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every variable; raise ConfigError naming the first bad one."""
    env = os.environ if env is None else env
    environment = _text(env, "CONNECT_ENV", "development")
    if environment not in ("development", "test", "production"):
        raise ConfigError("CONNECT_ENV", "must be development, test or production")

    template = _url(env, "PUBLIC_URL_TEMPLATE", DEFAULT_PUBLIC_URL_TEMPLATE, ("http", "https"))
    if "{school}" not in urlsplit(template).netloc:
        raise ConfigError("PUBLIC_URL_TEMPLATE", "must contain {school} in its host")
    platform_url = _url(env, "PLATFORM_URL", DEFAULT_PLATFORM_URL, ("http", "https")).rstrip("/")
    if environment == "production":
        for name, value in (("PUBLIC_URL_TEMPLATE", template), ("PLATFORM_URL", platform_url)):
            if not value.startswith("https://"):
                raise ConfigError(name, "must be https in production")

    dev_keys: tuple[bytes, bytes] | None = None
    if environment != "production" and not (
        env.get("KEY_ENCRYPTION_KEY") and env.get("SECRET_PEPPER")
    ):
        dev_keys = _dev_secrets(Path(_text(env, "CONNECT_DEV_SECRETS", str(DEV_SECRETS_FILE))))

    log_level = _text(env, "LOG_LEVEL", "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("LOG_LEVEL", "must be debug, info, warning or error")

    internal_token = _text(env, "INTERNAL_TOKEN", "")
    if not internal_token:
        if dev_keys is None and environment == "production":
            raise ConfigError("INTERNAL_TOKEN", "is required in production (a long random string)")
        # Outside production, derive it from the checkout's generated secrets so every local
        # process agrees without another file.
        seed_key = dev_keys[1] if dev_keys else _key(env, "SECRET_PEPPER", None)
        internal_token = hmac.new(seed_key, b"internal-token", hashlib.sha256).hexdigest()
    elif len(internal_token) < 32:
        raise ConfigError("INTERNAL_TOKEN", "must be at least 32 characters")

    grace = _int(env, "REFRESH_REUSE_GRACE_SECONDS", 10)
    access_ttl = _int(env, "ACCESS_TOKEN_TTL", 7200, minimum=60)
    return Settings(
        environment=environment,  # type: ignore[arg-type]
        database_url=_url(env, "DATABASE_URL", DEFAULT_DATABASE_URL, ("postgresql", "postgres")),
        redis_url=_url(env, "REDIS_URL", DEFAULT_REDIS_URL, ("redis", "rediss", "unix")),
        redis_prefix=_text(env, "REDIS_KEY_PREFIX", ""),
        urls=PublicUrls(school_template=template.rstrip("/"), platform_url=platform_url),
        key_encryption_key=_key(env, "KEY_ENCRYPTION_KEY", dev_keys[0] if dev_keys else None),
        secret_pepper=_key(env, "SECRET_PEPPER", dev_keys[1] if dev_keys else None),
        internal_token=internal_token,
        log_level=log_level,
        host=_text(env, "BIND_HOST", "127.0.0.1"),
        ports=Ports(
            identity=_int(env, "IDENTITY_PORT", 8081, minimum=1),
            gateway=_int(env, "GATEWAY_PORT", 8080, minimum=1),
            webhooks=_int(env, "WEBHOOKS_PORT", 8083, minimum=1),
            school_api=_int(env, "SCHOOL_API_PORT", 8082, minimum=1),
        ),
        tokens=TokenPolicy(
            access_token_ttl=access_ttl,
            refresh_reuse_grace=grace,
            retired_key_ttl=access_ttl + 300,
            key_rotation_interval=_int(env, "KEY_ROTATION_INTERVAL", 60 * 60 * 24 * 30, minimum=60),
        ),
        trust_forwarded_host=_bool(env, "TRUST_FORWARDED_HOST", False),
        db_pool_min=_int(env, "DB_POOL_MIN", 2, minimum=1),
        db_pool_max=_int(env, "DB_POOL_MAX", 10, minimum=1),
    )

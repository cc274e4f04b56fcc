"""One typed, frozen configuration object, read from the environment and validated at start.

Every service and the CLI call :func:`load_settings` once; a wrong value stops the process
with a :class:`ConfigError` that names the variable and what is wrong with it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from libs.common import redis_client

Environment = Literal["development", "test", "production"]

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/loopwise_connect"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PUBLIC_URL_TEMPLATE = "http://{school}.localhost:8080"
DEFAULT_PLATFORM_URL = "http://localhost:8080"
# Where development keeps its generated key-encryption key and secret pepper, so the CLI and
# the services of one checkout agree without any secret living in the repository.
DEV_SECRETS_FILE = Path(".data") / "dev-secrets"
# The gateway's default route table: the checkout's deploy/routes.toml (GATEWAY_ROUTES moves it).
DEFAULT_GATEWAY_ROUTES = str(Path(__file__).resolve().parents[2] / "deploy" / "routes.toml")


# The secret variables, and which of them each process needs: a part is given (and holds) only
# its own, so the internet-facing gateway never holds the key-encryption key or the pepper, and
# the migration job holds none. The school API signs upload URLs with the pepper; webhooks
# seals its signing secrets with the key-encryption key.
SECRET_VARIABLES = frozenset({"KEY_ENCRYPTION_KEY", "SECRET_PEPPER", "INTERNAL_TOKEN"})
SECRETS_OF: dict[str, frozenset[str]] = {
    "identity": SECRET_VARIABLES,
    "gateway": frozenset({"INTERNAL_TOKEN"}),
    "school-api": frozenset({"SECRET_PEPPER", "INTERNAL_TOKEN"}),
    "webhooks": frozenset({"KEY_ENCRYPTION_KEY", "INTERNAL_TOKEN"}),
    "migrate": frozenset(),
    # The storefront actions write school data and its events: no key, pepper or token.
    "storefront": frozenset(),
}


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
            # A school's subdomain is a DNS label (the schools table's CHECK): anything else
            # names no school, and costs no lookup (nor an encoding error on a byte that is not
            # text, which aiohttp hands on as a surrogate).
            if _SUBDOMAIN.fullmatch(label):
                return label
        return None


_SUBDOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)


REFRESH_TOKEN_IDLE_TTL_DEFAULT = 60 * 60 * 24 * 365
# How far back identity's sweep looks for refresh tokens of revoked grants when no lifetime
# bounds them (a pass at least this often finds each revocation: IDENTITY_SWEEP_INTERVAL).
_REVOKED_SWEEP_WINDOW = 60 * 60 * 24 * 90


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    access_token_ttl: int = 7200
    id_token_ttl: int = 3600
    authorization_code_ttl: int = 60
    # Seed 003: "long-lived refresh tokens keep your app working until the user revokes".
    # Idle: a refresh token not used for this long expires (each rotation starts it again);
    # max: the chain of rotations from one authorization ends this long after it began. 0 is
    # no limit. By default an app that refreshes at least once a year never has to ask again.
    refresh_token_idle_ttl: int = REFRESH_TOKEN_IDLE_TTL_DEFAULT
    refresh_token_max_ttl: int = 0
    # A rotated-away refresh token presented again within this many seconds is treated as a
    # concurrent retry and answered with the same successor instead of revoking the grant.
    refresh_reuse_grace: int = 10
    # How long a retired signing key stays published after it stopped signing: long enough
    # for every token it signed to expire.
    retired_key_ttl: int = 7200 + 300
    key_rotation_interval: int = 60 * 60 * 24 * 30

    @property
    def revoked_refresh_sweep_window(self) -> int:
        """Seconds: past this, a revoked grant's refresh tokens have been swept already."""
        limits = [t for t in (self.refresh_token_idle_ttl, self.refresh_token_max_ttl) if t > 0]
        return min(limits) if limits else _REVOKED_SWEEP_WINDOW


@dataclass(frozen=True, slots=True)
class Ports:
    identity: int = 8081
    gateway: int = 8080
    webhooks: int = 8083
    school_api: int = 8082


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Where the gateway reaches each service it fronts (base URLs, no trailing slash)."""

    identity: str = "http://127.0.0.1:8081"
    school_api: str = "http://127.0.0.1:8082"
    webhooks: str = "http://127.0.0.1:8083"


@dataclass(frozen=True, slots=True)
class GatewayPolicy:
    """The gateway's tunables; the routes themselves live in the route file."""

    routes_file: str = DEFAULT_GATEWAY_ROUTES
    upstream_connect_timeout: float = 2.0
    upstream_timeout: float = 30.0
    # Per client and school, unless the client row sets rate_limit_per_minute; the burst is
    # how many calls may arrive at once before the per-minute pace applies.
    rate_limit_per_minute: int = 600
    rate_limit_burst: int = 100
    # A verified token's signature is not checked again for this long (revocation still is).
    token_cache_ttl: float = 60.0
    # An unknown kid refetches the issuer's JWKS at most this often, so random kids cannot
    # flood identity.
    jwks_refresh_interval: float = 5.0
    cors_max_age: int = 600
    audit_buffer_size: int = 10_000
    # "durable": a protected call is answered only once its audit record is on
    # connect:audit (the records of concurrent calls share one XADD, a group commit), so a
    # gateway killed at any moment loses no record of a call it answered. "buffered": records
    # are written every few milliseconds after the answers (services/gateway/audit.py).
    # Durable by default: the fault suite loses audit records of answered calls only in
    # buffered mode (a SIGKILLed gateway's last ~20 ms), and durable's cost, one Redis round
    # trip per call, was within the ~2 ms allowed in the one clean quick bench of 2026-12-07
    # (gateway c=2 p99 4.97 and 4.23 ms against the bare proxy's 2.93 and 3.22: +1.5 ms on the
    # pairs' means; 11 earlier NOISY runs: medians durable +2.05, buffered +1.44 ms).
    audit_mode: str = "durable"
    # Whether the proxy in front of the gateway overwrites X-Forwarded-Host and -Proto (take
    # the Host, scheme and client address from them). Never implied by TRUST_FORWARDED_HOST,
    # which the services behind the gateway need: a balancer that passes a caller's own
    # X-Forwarded-Host on (AWS ALB does) would let the caller choose the school.
    trust_forwarded: bool = False
    # The networks of proxies in front of the gateway that append to X-Forwarded-For (a load
    # balancer): from a peer in one of them, the client is the right-most address of the
    # header outside them. Without them, every caller behind the balancer has its address, and
    # shares its sign-in and registration throttles.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # How long a gateway may answer "not revoked" from its own set after Redis last confirmed
    # it was following connect:revocations (libs/common/leases.py); identity's revoke waits
    # at most about this long for a gateway that stopped confirming. 0: ask Redis every call.
    revocation_lease: float = 2.0


@dataclass(frozen=True, slots=True)
class IdentityPolicy:
    """Identity's housekeeping and its bound on password hashing."""

    # How often each identity process sweeps expired codes, sessions and refresh tokens.
    sweep_interval: float = 300.0
    # Rows one DELETE removes: small enough that no sweep statement holds locks for long.
    sweep_batch_size: int = 1000
    # argon2 verifications (and hashes) running at once per process; each holds its memory
    # cost (64 MiB), so a login flood costs at most this many times that.
    password_hash_concurrency: int = 4
    # audit_log keeps a month's partition until its last day is this many days old, then
    # drops it whole (a year and a month by default, so a year-on-year review still finds
    # last year's month).
    audit_retention_days: int = 400
    # Client addresses in audit_log are cut to their network (/24, /48) once this many days
    # old: who called from where stays answerable for an investigation's usual window, and no
    # longer names a household after it.
    audit_ip_retention_days: int = 30


@dataclass(frozen=True, slots=True)
class Observability:
    """Tracing (libs/common/tracing.py) and the access log, from the standard OTEL_* variables.

    Tracing is off unless an exporter is named (OTEL_TRACES_EXPORTER) or an OTLP endpoint is
    given; the OTLP exporter reads its own variables (endpoint, headers, timeout) itself."""

    # none | otlp (OTLP over HTTP with protobuf) | console (one JSON span a line on stdout)
    exporter: str = "none"
    # Share of new traces recorded; a caller's sampled `traceparent` is always followed.
    sample_ratio: float = 1.0
    # One log line per request answered (libs/common/web.py).
    access_log: bool = True

    @property
    def tracing(self) -> bool:
        return self.exporter != "none"


_TRACE_EXPORTERS = ("none", "otlp", "console")


def _observability(env: Mapping[str, str]) -> Observability:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        if env.get(name, "").strip():
            _url(env, name, "", ("http", "https"))
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
    )
    if protocol not in ("", "http/protobuf"):
        # Only the HTTP exporter is installed: no gRPC in the image.
        name = (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
            if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
            else "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        raise ConfigError(name, f"must be http/protobuf, got {protocol!r}")
    endpoint_given = any(
        env.get(n, "").strip()
        for n in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or (
        "otlp" if endpoint_given else "none"
    )
    if exporter not in _TRACE_EXPORTERS:
        raise ConfigError("OTEL_TRACES_EXPORTER", "must be otlp, console or none")
    if _bool(env, "OTEL_SDK_DISABLED", False):
        exporter = "none"
    ratio = _float(env, "OTEL_TRACES_SAMPLER_ARG", 1.0)
    if ratio > 1:
        raise ConfigError("OTEL_TRACES_SAMPLER_ARG", f"must be between 0 and 1, got {ratio}")
    return Observability(
        exporter=exporter, sample_ratio=ratio, access_log=_bool(env, "ACCESS_LOG", True)
    )


DEFAULT_WEBHOOK_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    """How the webhooks service delivers: egress, retries, limits (all times in seconds)."""

    # Outbound sockets bind here, so every delivery leaves from the address partners allowlist.
    egress_ip: str | None = None
    # Deliveries leave through this HTTP proxy instead; it may carry credentials, so no repr.
    egress_proxy: str | None = field(default=None, repr=False)
    # What `GET /v1/webhooks/egress-ips` publishes: the public addresses behind NAT or the
    # proxy; the bound address when not given.
    published_egress_ips: tuple[str, ...] = ()
    # The wait before each retry; after the last one a delivery is dead (dead-letter list).
    retry_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY_SCHEDULE
    # Loopback targets are an SSRF hole in production and a necessity on a laptop.
    allow_loopback: bool = False
    timeout: float = 15.0
    # A subscription failing without a single success for this long is disabled.
    disable_after: float = 5 * 24 * 3600.0
    # After a secret rotation, deliveries carry the old secret's signature too for this long.
    secret_overlap: float = 24 * 3600.0
    # A receiver's Retry-After is honoured up to this much.
    retry_after_max: float = 3600.0
    # In flight at once per subscription (so one slow receiver cannot starve the others) and
    # per process.
    endpoint_concurrency: int = 16
    max_in_flight: int = 512
    # Stream entries a dispatcher read but never acknowledged are claimed by another after this.
    claim_idle: float = 30.0


@dataclass(frozen=True, slots=True)
class ObjectStorage:
    """STORAGE_URL, read: where uploaded files are kept (services/school_api/objectstore).

    `file:///abs/dir` keeps them on the local filesystem; `s3://bucket[/prefix]?endpoint=URL&
    region=R` in an S3-compatible store. The URL holds no secret: S3 credentials come from the
    AWS SDK's own sources (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a role), never from here.
    None (the variable unset) in production, where the school API refuses to start without it.
    """

    url: str
    kind: Literal["file", "s3"]
    root: Path | None = None  # file: the directory
    bucket: str = ""  # s3: the bucket, the key prefix, the endpoint and region (None: SDK's)
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None


# Development and tests keep uploaded files here (relative to the working directory, as
# DEV_SECRETS_FILE) unless STORAGE_URL says otherwise.
DEV_STORAGE_DIR = Path(".data") / "uploads"
_S3_OPTIONS = frozenset({"endpoint", "region"})


@dataclass(frozen=True, slots=True)
class Settings:
    environment: Environment
    database_url: str
    redis_url: str
    # Every Redis key and stream name is prefixed, so test runs (and tenants of one Redis)
    # never see each other's data.
    redis_prefix: str
    urls: PublicUrls
    # The key-encryption key that seals (KEY_ENCRYPTION_KEY) and the pepper new hashes and MACs
    # are made with (SECRET_PEPPER), read through `key_encryption_key` / `secret_pepper`. None
    # where the process was not given the secret (load_settings's `needs`): reading it then is
    # a programming error, raised, never an empty key.
    given_key_encryption_key: bytes | None = field(repr=False)
    given_secret_pepper: bytes | None = field(repr=False)
    # Proves to resource services that identity headers came from a gateway (sent as
    # X-Connect-Internal-Token); resource services refuse calls without it.
    internal_token: str = field(repr=False, default="")
    # The generated development secrets file both KEY_ENCRYPTION_KEY and SECRET_PEPPER came
    # from (neither variable set); None when either was given. `make dev` may start its own
    # database afresh for secrets of this file (services/dev/database.py), never for given
    # ones.
    dev_secrets: Path | None = None
    # CONNECT_DEMO_ADMIN_PASSWORD: the demo school's admin's password when the demo is seeded
    # (`make dev`, `migrate --demo` under `make up`); generated when not given.
    demo_admin_password: str | None = field(repr=False, default=None)
    # CONNECT_DEMO_ACTIVITY: seconds between the school API's demo storefront actions
    # (services/school_api/storefront/demo.py); 0 (the default) is off. `make dev` sets 5.
    demo_activity: float = 0.0
    log_level: str = "info"
    host: str = "127.0.0.1"
    ports: Ports = field(default_factory=Ports)
    tokens: TokenPolicy = field(default_factory=TokenPolicy)
    trust_forwarded_host: bool = False
    db_pool_min: int = 2
    db_pool_max: int = 10
    # Where a PostgreSQL session is needed (LISTEN; session advisory locks): the server itself
    # or a session-pooling PgBouncer, when DATABASE_URL is a transaction-pooling one.
    # DATABASE_URL when not given.
    database_session_url: str = ""
    # asyncpg's per-connection cache of named prepared statements. 0 behind a transaction
    # pooler (PgBouncer before 1.21), where a named statement lives on one server session
    # and the next transaction may run on another (libs/common/db.py).
    database_statement_cache: int = 100
    upstreams: Upstreams = field(default_factory=Upstreams)
    gateway: GatewayPolicy = field(default_factory=GatewayPolicy)
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy)
    identity: IdentityPolicy = field(default_factory=IdentityPolicy)
    observability: Observability = field(default_factory=Observability)
    previous_key_encryption_keys: tuple[bytes, ...] = field(repr=False, default=())
    previous_secret_pepper: bytes | None = field(repr=False, default=None)
    storage: ObjectStorage | None = None
    # How often the school API sweeps uploads never PUT or never confirmed (UPLOAD_SWEEP_INTERVAL).
    upload_sweep_interval: float = 60.0

    @property
    def key_encryption_keys(self) -> tuple[bytes, ...]:
        """Every configured key-encryption key, the sealing one first."""
        return (self.key_encryption_key, *self.previous_key_encryption_keys)

    @property
    def secret_peppers(self) -> tuple[bytes, ...]:
        """The pepper, then the previous one during a rotation's overlap."""
        if self.previous_secret_pepper is None:
            return (self.secret_pepper,)
        return (self.secret_pepper, self.previous_secret_pepper)

    @property
    def key_encryption_key(self) -> bytes:
        return _held(self.given_key_encryption_key, "KEY_ENCRYPTION_KEY")

    @property
    def secret_pepper(self) -> bytes:
        return _held(self.given_secret_pepper, "SECRET_PEPPER")

    @property
    def session_database_url(self) -> str:
        """The DSN for what needs a PostgreSQL session of its own (LISTEN, session locks)."""
        return self.database_session_url or self.database_url

    @property
    def is_development(self) -> bool:
        return self.environment != "production"

    def stream(self, name: str) -> str:
        """The full Redis name of a stream or key: `connect:events` plus the run's prefix."""
        return f"{self.redis_prefix}{name}"


def _held(value: bytes | None, name: str) -> bytes:
    if value is None:
        raise ConfigError(name, "is not given to this process (libs/common/config.SECRETS_OF)")
    return value


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


def _lifetime(env: Mapping[str, str], name: str, default: int) -> int:
    """Seconds, 0 for no limit; a limit shorter than a minute would end tokens in use."""
    value = _int(env, name, default)
    if 0 < value < 60:
        raise ConfigError(name, f"must be 0 (no limit) or at least 60 seconds, got {value}")
    return value


def _refresh_lifetimes(env: Mapping[str, str]) -> dict[str, int]:
    """REFRESH_TOKEN_IDLE_TTL and REFRESH_TOKEN_MAX_TTL (seconds, 0: no limit)."""
    idle = _lifetime(env, "REFRESH_TOKEN_IDLE_TTL", REFRESH_TOKEN_IDLE_TTL_DEFAULT)
    longest = _lifetime(env, "REFRESH_TOKEN_MAX_TTL", 0)
    if longest and idle > longest:
        # An idle limit beyond the absolute one would never apply: a sign of a mistake.
        raise ConfigError(
            "REFRESH_TOKEN_IDLE_TTL",
            f"must be at most REFRESH_TOKEN_MAX_TTL ({longest}) when that is set, got {idle}",
        )
    return {"refresh_token_idle_ttl": idle, "refresh_token_max_ttl": longest}


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {raw!r}") from None
    if not value >= minimum or value == float("inf"):
        raise ConfigError(name, f"must be a finite number of at least {minimum}, got {raw}")
    return value


def _audit_mode(env: Mapping[str, str]) -> str:
    mode = env.get("GATEWAY_AUDIT_MODE", "durable").strip().lower() or "durable"
    if mode not in ("durable", "buffered"):
        raise ConfigError("GATEWAY_AUDIT_MODE", "must be durable or buffered")
    return mode


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


def _object_storage(env: Mapping[str, str], environment: str) -> ObjectStorage | None:
    name = "STORAGE_URL"
    raw = env.get(name, "").strip()
    if not raw:
        if environment == "production":
            return None  # the school API, the one part that stores files, refuses to start
        root = DEV_STORAGE_DIR.resolve()
        return ObjectStorage(url=root.as_uri(), kind="file", root=root)
    parts = urlsplit(raw)
    if parts.username or parts.password:
        raise ConfigError(name, "must not hold credentials (the AWS SDK's variables give them)")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(name, "a file: URL must name an absolute directory, file:///dir")
        if parts.query or parts.fragment:
            raise ConfigError(name, "a file: URL takes no query or fragment")
        root = Path(unquote(parts.path))
        return ObjectStorage(url=raw, kind="file", root=root)
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise ConfigError(name, "an s3: URL must name a valid bucket, s3://bucket[/prefix]")
        options = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(options) - _S3_OPTIONS
        if unknown:
            raise ConfigError(name, f"unknown option {sorted(unknown)[0]!r} (endpoint, region)")
        if any(len(values) != 1 or not values[0] for values in options.values()):
            raise ConfigError(name, "each option once, with a value")
        endpoint = options.get("endpoint", [None])[0]
        if endpoint is not None:
            ends = urlsplit(endpoint)
            if ends.scheme not in ("http", "https") or not ends.netloc:
                raise ConfigError(name, "endpoint must be an http or https URL")
            if environment == "production" and ends.scheme != "https":
                raise ConfigError(name, "endpoint must be https in production")
        prefix = parts.path.strip("/")
        return ObjectStorage(
            url=raw,
            kind="s3",
            bucket=bucket,
            prefix=f"{prefix}/" if prefix else "",
            endpoint=endpoint,
            region=options.get("region", [None])[0],
        )
    raise ConfigError(name, "must be a file:///dir or s3://bucket URL")


def _redis_url(env: Mapping[str, str], name: str, default: str) -> str:
    # One node, a Cluster or Sentinel: libs/common/redis_client.py reads it the same way.
    value = _text(env, name, default)
    try:
        redis_client.parse(value)
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None
    return value


def _seconds_list(
    env: Mapping[str, str], name: str, default: tuple[float, ...]
) -> tuple[float, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    values = []
    for item in raw.split(","):
        try:
            value = float(item.strip())
        except ValueError:
            raise ConfigError(
                name, f"must be comma-separated seconds like 5,300,1800; got {raw!r}"
            ) from None
        if not 0 <= value < float("inf"):
            raise ConfigError(name, f"each wait must be a finite number >= 0, got {item.strip()}")
        values.append(value)
    return tuple(values)


def _networks(
    env: Mapping[str, str], name: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated addresses or CIDR networks (`10.0.0.0/8, 192.0.2.7`)."""
    networks = []
    for item in env.get(name, "").split(","):
        if not item.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(name, f"must list networks, got {item.strip()!r}") from None
    return tuple(networks)


def _ip(env: Mapping[str, str], name: str, raw: str) -> str:
    try:
        address = ipaddress.ip_address(raw.strip())
    except ValueError:
        raise ConfigError(name, f"must be an IP address, got {raw.strip()!r}") from None
    if address.is_unspecified or address.is_multicast:
        raise ConfigError(name, f"must be a unicast address, got {address}")
    return str(address)


def _webhook_policy(env: Mapping[str, str], environment: str) -> WebhookPolicy:
    production = environment == "production"
    egress_raw = env.get("WEBHOOK_EGRESS_IP", "").strip()
    egress_ip = _ip(env, "WEBHOOK_EGRESS_IP", egress_raw) if egress_raw else None
    proxy = env.get("WEBHOOK_EGRESS_PROXY", "").strip() or None
    if proxy is not None:
        parts = urlsplit(proxy)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("WEBHOOK_EGRESS_PROXY", "must be an http:// or https:// proxy URL")
    published_raw = env.get("WEBHOOK_PUBLISHED_EGRESS_IPS", "").strip()
    published = tuple(
        _ip(env, "WEBHOOK_PUBLISHED_EGRESS_IPS", item)
        for item in published_raw.split(",")
        if item.strip()
    )
    if not published and egress_ip:
        published = (egress_ip,)
    allow_loopback = _bool(env, "WEBHOOK_ALLOW_LOOPBACK", not production)
    if allow_loopback and production:
        raise ConfigError("WEBHOOK_ALLOW_LOOPBACK", "must not be true in production (SSRF)")
    return WebhookPolicy(
        egress_ip=egress_ip,
        egress_proxy=proxy,
        published_egress_ips=published,
        retry_schedule=_seconds_list(env, "WEBHOOK_RETRY_SCHEDULE", DEFAULT_WEBHOOK_RETRY_SCHEDULE),
        allow_loopback=allow_loopback,
        timeout=_float(env, "WEBHOOK_TIMEOUT_SECONDS", 15.0, minimum=0.1),
        disable_after=_float(env, "WEBHOOK_DISABLE_AFTER_SECONDS", 5 * 24 * 3600.0, minimum=1),
        secret_overlap=_float(env, "WEBHOOK_SECRET_OVERLAP_SECONDS", 24 * 3600.0),
        retry_after_max=_float(env, "WEBHOOK_RETRY_AFTER_MAX_SECONDS", 3600.0),
        endpoint_concurrency=_int(env, "WEBHOOK_ENDPOINT_CONCURRENCY", 16, minimum=1),
        max_in_flight=_int(env, "WEBHOOK_MAX_IN_FLIGHT", 512, minimum=1),
        claim_idle=_float(env, "WEBHOOK_CLAIM_IDLE_SECONDS", 30.0, minimum=0.1),
    )


def _at_most(name: str, value: float, maximum: float) -> None:
    if value > maximum:
        raise ConfigError(name, f"must be at most {maximum:g}, got {value:g}")


def _identity_policy(env: Mapping[str, str]) -> IdentityPolicy:
    interval = _float(env, "IDENTITY_SWEEP_INTERVAL_SECONDS", 300.0, minimum=1.0)
    # A day between sweeps already lets a busy issuer pile up a day of dead rows.
    _at_most("IDENTITY_SWEEP_INTERVAL_SECONDS", interval, 86400)
    batch = _int(env, "IDENTITY_SWEEP_BATCH_SIZE", 1000, minimum=1)
    # Larger batches defeat the point of batching: one DELETE would lock that many rows.
    _at_most("IDENTITY_SWEEP_BATCH_SIZE", batch, 50_000)
    concurrency = _int(env, "PASSWORD_HASH_CONCURRENCY", 4, minimum=1)
    # Each one holds argon2's 64 MiB: 64 of them is already 4 GiB.
    _at_most("PASSWORD_HASH_CONCURRENCY", concurrency, 64)
    return IdentityPolicy(
        sweep_interval=interval,
        sweep_batch_size=batch,
        password_hash_concurrency=concurrency,
        audit_retention_days=_int(env, "AUDIT_RETENTION_DAYS", 400, minimum=1),
        audit_ip_retention_days=_int(env, "AUDIT_IP_RETENTION_DAYS", 30, minimum=1),
    )


def _key(env: Mapping[str, str], name: str, dev_value: bytes | None) -> bytes:
    raw = env.get(name, "").strip()
    if not raw:
        if dev_value is None:
            raise ConfigError(name, "is required in production (32 random bytes, base64)")
        return dev_value
    return _decoded_key(name, raw)


def _decoded_key(name: str, raw: str) -> bytes:
    try:
        # Either alphabet, padding optional; any other character is an error, not dropped.
        padded = (raw + "=" * (-len(raw) % 4)).replace("-", "+").replace("_", "/")
        value = base64.b64decode(padded, validate=True)
    except ValueError:
        raise ConfigError(name, "must be base64 (32 random bytes)") from None
    if len(value) != 32:
        raise ConfigError(name, f"must decode to 32 bytes, got {len(value)}")
    return value


def _previous_keys(env: Mapping[str, str], kek: bytes) -> tuple[bytes, ...]:
    """KEY_ENCRYPTION_KEYS_PREVIOUS: comma-separated keys that still open, never seal."""
    name = "KEY_ENCRYPTION_KEYS_PREVIOUS"
    found: list[bytes] = []
    for position, item in enumerate(env.get(name, "").split(","), start=1):
        if not item.strip():
            continue
        try:
            key = _decoded_key(name, item.strip())
        except ConfigError as exc:
            # Which one of the list, never its value.
            raise ConfigError(name, f"key {position}: {exc.problem}") from None
        if key == kek:
            raise ConfigError(name, f"key {position} is KEY_ENCRYPTION_KEY itself")
        if key not in found:
            found.append(key)
    return tuple(found)


def _previous_pepper(env: Mapping[str, str], pepper: bytes) -> bytes | None:
    raw = env.get("SECRET_PEPPER_PREVIOUS", "").strip()
    if not raw:
        return None
    previous = _decoded_key("SECRET_PEPPER_PREVIOUS", raw)
    if previous == pepper:
        raise ConfigError("SECRET_PEPPER_PREVIOUS", "is SECRET_PEPPER itself")
    return previous


def _secret_key(
    env: Mapping[str, str],
    name: str,
    needs: frozenset[str],
    dev_keys: tuple[bytes, bytes] | None,
    index: int,
) -> bytes | None:
    if name not in needs and dev_keys is None:
        # Production (or both given): a process that does not use it never reads it.
        return None
    return _key(env, name, dev_keys[index] if dev_keys else None)


def _dev_secrets(path: Path) -> tuple[bytes, bytes]:
    """Development's key-encryption key and pepper, generated once per checkout."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under another name, then linked into place: processes starting at once
        # (the containers of `make up`) all end up with the one that won, never a half-written
        # file or their own.
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(64))
            # Another process linked its draft first: theirs is the one everyone reads.
            with contextlib.suppress(FileExistsError):
                os.link(draft, path)
        finally:
            draft.unlink()
    data = path.read_bytes()
    if len(data) != 64:
        raise ConfigError("KEY_ENCRYPTION_KEY", f"{path} is damaged; delete it to start afresh")
    return data[:32], data[32:]


def _demo_admin_password(env: Mapping[str, str]) -> str | None:
    password = env.get("CONNECT_DEMO_ADMIN_PASSWORD", "")
    if not password:
        return None
    # The account rules' own minimum (services/identity/users.py), checked at start rather
    # than after the stores are up.
    if len(password) < 8:
        raise ConfigError("CONNECT_DEMO_ADMIN_PASSWORD", "must have at least 8 characters")
    if password != password.strip():
        raise ConfigError("CONNECT_DEMO_ADMIN_PASSWORD", "must not begin or end with a space")
    return password


def _demo_activity(env: Mapping[str, str], environment: str) -> float:
    raw = env.get("CONNECT_DEMO_ACTIVITY", "").strip().lower()
    if raw in ("", "off", "false", "no"):
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(
            "CONNECT_DEMO_ACTIVITY", "must be seconds between actions, or off"
        ) from None
    if seconds and not 0.2 <= seconds <= 3600:
        raise ConfigError("CONNECT_DEMO_ACTIVITY", "must be between 0.2 and 3600 seconds, or off")
    if seconds and environment == "production":
        # Made-up orders and members among a real school's: never.
        raise ConfigError("CONNECT_DEMO_ACTIVITY", "writes demo data: never in production")
    return seconds


def _lease(env: Mapping[str, str]) -> float:
    lease = _float(env, "GATEWAY_REVOCATION_LEASE", 2.0)
    if 0 < lease < 0.2 or lease > 30:
        # Shorter leases would be renewed more often than a follower's read returns; longer
        # ones would hold a revoke's answer too long when a gateway stops.
        raise ConfigError("GATEWAY_REVOCATION_LEASE", "must be 0 or between 0.2 and 30 seconds")
    return lease


def _internal_token(
    env: Mapping[str, str],
    environment: str,
    dev_keys: tuple[bytes, bytes] | None,
    needed: bool,
) -> str:
    if environment == "production" and not needed:
        # Resource services refuse every call under an empty token; a process that sends
        # none (the migration) never reads it.
        return ""
    token = _text(env, "INTERNAL_TOKEN", "")
    if token:
        if len(token) < 32:
            raise ConfigError("INTERNAL_TOKEN", "must be at least 32 characters")
        return token
    if environment == "production":
        raise ConfigError("INTERNAL_TOKEN", "is required in production (a long random string)")
    # Outside production, derive it from the generated (or given) secrets so every local
    # process agrees without another file.
    seed_key = dev_keys[1] if dev_keys else _key(env, "SECRET_PEPPER", None)
    return hmac.new(seed_key, b"internal-token", hashlib.sha256).hexdigest()


def load_settings(
    env: Mapping[str, str] | None = None, *, needs: frozenset[str] = SECRET_VARIABLES
) -> Settings:
    """Read and validate every variable; raise ConfigError naming the first bad one.

    `needs`: the secret variables this process uses (SECRETS_OF); in production only those are
    required, and a process never reads (so never holds) a key or pepper it does not need,
    even where one is set. Development and tests generate or derive every one."""
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
    dev_secrets: Path | None = None
    if environment != "production" and not (
        env.get("KEY_ENCRYPTION_KEY") and env.get("SECRET_PEPPER")
    ):
        dev_file = Path(_text(env, "CONNECT_DEV_SECRETS", str(DEV_SECRETS_FILE)))
        dev_keys = _dev_secrets(dev_file)
        if not (_text(env, "KEY_ENCRYPTION_KEY", "") or _text(env, "SECRET_PEPPER", "")):
            dev_secrets = dev_file

    log_level = _text(env, "LOG_LEVEL", "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("LOG_LEVEL", "must be debug, info, warning or error")

    grace = _int(env, "REFRESH_REUSE_GRACE_SECONDS", 10)
    access_ttl = _int(env, "ACCESS_TOKEN_TTL", 7200, minimum=60)
    ports = Ports(
        identity=_int(env, "IDENTITY_PORT", 8081, minimum=1),
        gateway=_int(env, "GATEWAY_PORT", 8080, minimum=1),
        webhooks=_int(env, "WEBHOOKS_PORT", 8083, minimum=1),
        school_api=_int(env, "SCHOOL_API_PORT", 8082, minimum=1),
    )
    upstream_schemes = ("http", "https")
    upstreams = Upstreams(
        identity=_url(
            env, "IDENTITY_URL", f"http://127.0.0.1:{ports.identity}", upstream_schemes
        ).rstrip("/"),
        school_api=_url(
            env, "SCHOOL_API_URL", f"http://127.0.0.1:{ports.school_api}", upstream_schemes
        ).rstrip("/"),
        webhooks=_url(
            env, "WEBHOOKS_URL", f"http://127.0.0.1:{ports.webhooks}", upstream_schemes
        ).rstrip("/"),
    )
    gateway = GatewayPolicy(
        routes_file=_text(env, "GATEWAY_ROUTES", DEFAULT_GATEWAY_ROUTES),
        upstream_connect_timeout=_float(env, "GATEWAY_UPSTREAM_CONNECT_TIMEOUT", 2.0, minimum=0.01),
        upstream_timeout=_float(env, "GATEWAY_UPSTREAM_TIMEOUT", 30.0, minimum=0.01),
        rate_limit_per_minute=_int(env, "RATE_LIMIT_PER_MINUTE", 600, minimum=1),
        rate_limit_burst=_int(env, "RATE_LIMIT_BURST", 100, minimum=1),
        token_cache_ttl=_float(env, "GATEWAY_TOKEN_CACHE_TTL", 60.0),
        jwks_refresh_interval=_float(env, "GATEWAY_JWKS_REFRESH_INTERVAL", 5.0),
        cors_max_age=_int(env, "GATEWAY_CORS_MAX_AGE", 600),
        audit_buffer_size=_int(env, "GATEWAY_AUDIT_BUFFER", 10_000, minimum=1),
        audit_mode=_audit_mode(env),
        trust_forwarded=_bool(env, "GATEWAY_TRUST_FORWARDED", False),
        trusted_proxies=_networks(env, "GATEWAY_TRUSTED_PROXIES"),
        revocation_lease=_lease(env),
    )
    database_url = _url(env, "DATABASE_URL", DEFAULT_DATABASE_URL, ("postgresql", "postgres"))
    kek = _secret_key(env, "KEY_ENCRYPTION_KEY", needs, dev_keys, 0)
    pepper = _secret_key(env, "SECRET_PEPPER", needs, dev_keys, 1)
    return Settings(
        environment=environment,  # type: ignore[arg-type]
        database_url=database_url,
        redis_url=_redis_url(env, "REDIS_URL", DEFAULT_REDIS_URL),
        redis_prefix=_text(env, "REDIS_KEY_PREFIX", ""),
        urls=PublicUrls(school_template=template.rstrip("/"), platform_url=platform_url),
        given_key_encryption_key=kek,
        given_secret_pepper=pepper,
        # KEY_ENCRYPTION_KEYS_PREVIOUS / SECRET_PEPPER_PREVIOUS: what a part is not given, it
        # does not hold in any generation.
        previous_key_encryption_keys=_previous_keys(env, kek) if kek is not None else (),
        previous_secret_pepper=_previous_pepper(env, pepper) if pepper is not None else None,
        dev_secrets=dev_secrets,
        demo_admin_password=_demo_admin_password(env),
        demo_activity=_demo_activity(env, environment),
        log_level=log_level,
        host=_text(env, "BIND_HOST", "127.0.0.1"),
        ports=ports,
        tokens=TokenPolicy(
            access_token_ttl=access_ttl,
            **_refresh_lifetimes(env),
            refresh_reuse_grace=grace,
            retired_key_ttl=access_ttl + 300,
            key_rotation_interval=_int(env, "KEY_ROTATION_INTERVAL", 60 * 60 * 24 * 30, minimum=60),
        ),
        trust_forwarded_host=_bool(env, "TRUST_FORWARDED_HOST", False),
        db_pool_min=_int(env, "DB_POOL_MIN", 2, minimum=1),
        db_pool_max=_int(env, "DB_POOL_MAX", 10, minimum=1),
        database_session_url=_url(
            env, "DATABASE_SESSION_URL", database_url, ("postgresql", "postgres")
        ),
        database_statement_cache=_int(env, "DATABASE_STATEMENT_CACHE", 100),
        upstreams=upstreams,
        gateway=gateway,
        webhooks=_webhook_policy(env, environment),
        identity=_identity_policy(env),
        observability=_observability(env),
        storage=_object_storage(env, environment),
        upload_sweep_interval=_float(env, "UPLOAD_SWEEP_INTERVAL", 60.0, minimum=0.1),
        # Last, so a wrong value of any other variable is the one reported first.
        internal_token=_internal_token(env, environment, dev_keys, "INTERNAL_TOKEN" in needs),
    )

"""The route table is configuration: the default file maps the seeds' scopes, and a wrong file
stops the gateway at start with an error naming its line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from libs.common import keys
from libs.common.config import ConfigError, Settings, load_settings
from services.gateway import routetable
from services.gateway.routetable import RouteTableError
from tests.test_gateway_support import make_world, user_grant

CLI = str(Path(sys.executable).with_name("loopwise-connect"))

# The seeds' mapping (seed 002, contract section 7): resource, read scopes, write scopes.
SEED_MAPPING = [
    ("courses", ["courses:read"], ["courses:write"]),
    ("members", ["students:read"], ["students:write"]),
    # Seed 002's words: courses:read reads a course's curriculum and enrollment data,
    # students:write manages enrollments, appearance:read the appearance and theme only.
    ("enrollments", ["courses:read", "students:read"], ["students:write"]),
    ("chapters", ["curriculum:read", "courses:read"], ["curriculum:write"]),
    ("lessons", ["curriculum:read", "courses:read"], ["curriculum:write"]),
    ("materials", ["curriculum:read", "courses:read"], ["curriculum:write"]),
    ("settings", ["school:read"], ["school:write", "appearance:write"]),
    ("settings/appearance", ["appearance:read", "school:read"], ["appearance:write"]),
    ("site-info", ["school:read"], None),
    ("orders", ["orders:read"], None),
    ("events", ["events:read"], ["events:write"]),
    ("membership-plans", ["membership_plans:read"], ["membership_plans:write"]),
    ("coupons", ["coupons:read"], ["coupons:write"]),
    ("posts", ["posts:read"], ["posts:write"]),
    ("digital-downloads", ["digital_products:read"], ["digital_products:write"]),
    ("comments", ["comments:read"], None),
    ("lecturers", ["lecturers:read"], ["lecturers:write"]),
    ("subscriptions", ["subscriptions:read"], ["subscriptions:write"]),
    ("analytics", ["analytics:read"], None),
]

UPSTREAMS = {
    "identity": "http://127.0.0.1:1",
    "school_api": "http://127.0.0.1:2",
    "webhooks": "http://127.0.0.1:3",
}


def _parse(text: str) -> routetable.RouteTable:
    return routetable.parse(text, "routes.toml", UPSTREAMS)


def test_the_default_table_maps_the_seed_scopes(settings: Settings) -> None:
    table = routetable.load(settings.gateway.routes_file, settings)
    for resource, reads, writes in SEED_MAPPING:
        route = table.match(f"/api/v1/{resource}")
        assert route is not None and route.protected, resource
        assert route.upstream == "school_api"
        assert route.required("GET") == tuple(reads), resource
        assert route.required("HEAD") == tuple(reads), resource
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            assert route.required(method) == (tuple(writes) if writes else None), (resource, method)
        # Sub-resources follow their parent (course reviews, event attendees).
        assert table.match(f"/api/v1/{resource}/7/sub") is route
    uploads = table.match("/api/v1/uploads/abc")
    assert uploads is not None and uploads.required("POST") == ("storage:write",)
    # The storage edge: public (the signed URL is the credential), bodies capped as they stream.
    storage = table.match("/storage/uploads/1/abc/x.png")
    assert storage is not None and not storage.protected and storage.upstream == "school_api"
    assert storage.max_body == 20 * 1024 * 1024
    webhooks = table.match("/api/v1/webhooks/1/deliveries")
    assert webhooks is not None and webhooks.upstream == "webhooks"
    assert webhooks.required("POST") == ()  # any valid token; webhooks checks per event type
    for path in (
        "/.well-known/openid-configuration",
        "/v1/oauth/token",
        "/oauth/authorize",
        "/api/oauth/token",
        "/api/oauth/register/abc",
        "/static/app.css",
    ):
        route = table.match(path)
        assert route is not None and not route.protected and route.upstream == "identity", path
    assert table.match("/api/v1/coursesX") is None
    assert table.match("/api/v2/courses") is None


def test_the_longest_prefix_wins_on_whole_segments() -> None:
    table = _parse(
        """
[[route]]
prefix = "/api/v1/courses"
upstream = "school_api"
read = ["courses:read"]

[[route]]
prefix = "/api/v1/courses/exports"
upstream = "school_api"
read = ["analytics:read"]
methods = { POST = ["write"] }

[[public]]
prefix = "/"
upstream = "identity"
"""
    )

    def prefix(path: str) -> str | None:
        route = table.match(path)
        return route.prefix if route else None

    assert prefix("/api/v1/courses/exports/2024") == "/api/v1/courses/exports"
    assert prefix("/api/v1/courses/exportsX") == "/api/v1/courses"
    assert prefix("/api/v1/courses") == "/api/v1/courses"
    assert prefix("/anything/else") == "/"
    exports = table.match("/api/v1/courses/exports")
    assert exports is not None
    assert exports.required("POST") == ("write",)
    assert exports.required("DELETE") is None
    assert exports.allowed_methods == ("GET", "HEAD", "POST")


def test_an_extra_upstream_may_be_declared_in_the_file() -> None:
    table = _parse(
        """
[upstreams]
reports = "http://reports.internal:9000/"

[[route]]
prefix = "/api/v1/reports"
upstream = "reports"
all_methods = ["analytics:read"]
"""
    )
    assert table.upstreams["reports"] == "http://reports.internal:9000"
    route = table.match("/api/v1/reports/x")
    assert route is not None and route.required("DELETE") == ("analytics:read",)


GOOD_ROUTE = """\
[[route]]
prefix = "/api/v1/courses"
upstream = "school_api"
read = ["courses:read"]
"""


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (GOOD_ROUTE + '\n[[route]]\nprefix = "/api/v1/x\nupstream = 1\n', 7, "TOML syntax"),
        (GOOD_ROUTE + '\n[[route]]\nprefix = "/api/v1/x"\nupstream = "nowhere"\n', 8, "nowhere"),
        (
            GOOD_ROUTE + '\n[[route]]\nprefix = "/api/v1/x"\nupstream = "school_api"\n'
            'read = ["courses:reed"]\n',
            9,
            "courses:reed",
        ),
        (
            GOOD_ROUTE + '\n[[route]]\nprefix = "/api/v1/x"\nupstream = "school_api"\n'
            'methods = { FETCH = ["courses:read"] }\n',
            9,
            "FETCH",
        ),
        (
            GOOD_ROUTE + '\n[[route]]\nprefix = "/api/v1/courses/"\nupstream = "school_api"\n'
            'read = ["courses:read"]\n',
            7,
            "duplicate prefix",
        ),
        (
            GOOD_ROUTE + '\n[[route]]\nprefix = "/api/v1/x"\nupstream = "school_api"\n'
            'wirte = ["courses:write"]\n',
            9,
            "wirte",
        ),
        (
            GOOD_ROUTE + '\n[[route]]\nprefix = "/api/v1/x"\nupstream = "school_api"\n',
            6,
            "no method",
        ),
        (GOOD_ROUTE + '\n[[public]]\nprefix = "api/v1"\nupstream = "identity"\n', 7, "prefix"),
        (GOOD_ROUTE + '\n[[route]]\nprefix = "/api/../x"\nupstream = "identity"\n', 7, "prefix"),
        ('[upstreams]\nreports = "ftp://x"\n' + GOOD_ROUTE, 2, "reports"),
        (GOOD_ROUTE + '\n[[routes]]\nprefix = "/x"\n', 6, "routes"),
        (
            GOOD_ROUTE + '\n[[public]]\nprefix = "/storage/"\nupstream = "school_api"\n'
            'max_body = "20M"\n',
            9,
            "max_body",
        ),
        (
            GOOD_ROUTE + '\n[[route]]\nprefix = "/api/v1/x"\nupstream = "school_api"\n'
            "read = []\nmax_body = 10\n",
            10,
            "max_body",
        ),
    ],
)
def test_a_bad_route_file_is_refused_naming_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(RouteTableError) as caught:
        _parse(text)
    assert caught.value.line == line, str(caught.value)
    assert f"routes.toml:{line}:" in str(caught.value)
    assert words in str(caught.value)


def test_the_gateway_does_not_start_with_a_bad_route_file(
    tmp_path: Path, gateway_env: dict[str, str]
) -> None:
    bad = tmp_path / "bad-routes.toml"
    bad.write_text(GOOD_ROUTE + '\n[[route]]\nprefix = "/api/v1/x"\nupstream = "nowhere"\n')
    done = subprocess.run(
        [CLI, "serve", "gateway", "--port", "1"],
        env={**gateway_env, "GATEWAY_ROUTES": str(bad), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"{bad}:8: unknown upstream 'nowhere'" in done.stderr
    missing = subprocess.run(
        [CLI, "serve", "gateway", "--port", "1"],
        env={**gateway_env, "GATEWAY_ROUTES": str(tmp_path / "none.toml"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert "none.toml" in missing.stderr


def test_gateway_settings_are_validated() -> None:
    base = {"CONNECT_ENV": "test"}
    settings = load_settings(
        {
            **base,
            "IDENTITY_PORT": "9101",
            "RATE_LIMIT_PER_MINUTE": "60",
            "GATEWAY_UPSTREAM_TIMEOUT": "2.5",
        }
    )
    assert settings.upstreams.identity == "http://127.0.0.1:9101"
    assert settings.gateway.rate_limit_per_minute == 60
    assert settings.gateway.upstream_timeout == 2.5
    assert settings.gateway.trust_forwarded is False
    assert settings.gateway.trusted_proxies == ()
    # The services behind the gateway trust it; that says nothing of what stands in front of
    # the gateway, where a balancer may pass a caller's own X-Forwarded-Host on.
    assert not load_settings({**base, "TRUST_FORWARDED_HOST": "true"}).gateway.trust_forwarded
    assert load_settings({**base, "GATEWAY_TRUST_FORWARDED": "true"}).gateway.trust_forwarded
    proxies = load_settings({**base, "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7,::1"})
    assert [str(n) for n in proxies.gateway.trusted_proxies] == [
        "10.0.0.0/8",
        "192.0.2.7/32",
        "::1/128",
    ]
    for variable, value in (
        ("GATEWAY_UPSTREAM_TIMEOUT", "soon"),
        ("GATEWAY_UPSTREAM_TIMEOUT", "0"),
        ("GATEWAY_UPSTREAM_TIMEOUT", "nan"),
        ("RATE_LIMIT_PER_MINUTE", "0"),
        ("RATE_LIMIT_BURST", "-1"),
        ("SCHOOL_API_URL", "ftp://school-api"),
        ("IDENTITY_URL", "not a url"),
        ("GATEWAY_TRUST_FORWARDED", "maybe"),
        ("GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8, balancer"),
        ("GATEWAY_TRUSTED_PROXIES", "10.0.0.0/33"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_settings({**base, variable: value})
        assert caught.value.variable == variable


async def test_the_revocation_mark_is_the_one_identity_writes(
    pool: Any, redis: Any, settings: Settings
) -> None:
    # One name for the mark now (libs/common/streams.py REVOKED_KEY): what used to hold two
    # copies equal holds what they name instead, the mark identity's revoke writes being the
    # one the gateway reads, both when it loads the marks and on a call (revoked_key, which
    # the per-call prefix of context.py is made from).
    from services.gateway import revocation
    from services.identity import grants

    world = await make_world(pool, settings, "rt-mark", 0)
    grant_id = await user_grant(pool, world, ["read"])
    await grants.revoke_grants(pool, redis, settings, [grant_id], reason="user_revocation")
    loaded = revocation.RevokedGrants()
    await revocation.load_marks(redis, settings, loaded)
    assert str(grant_id) in loaded
    mark = keys.revoked_mark(settings, world.school.id, grant_id)
    assert await redis.get(mark) == b"user_revocation"

"""`loopwise-connect`: serve each part and administer, against DATABASE_URL and REDIS_URL.

The argument parser and the dispatch: `serve`, `migrate`, `dev` and `cluster` (`services/dev/`)
and `storefront <action>` (the school API's storefront, `services/school_api/storefront/`) are
run here; every other command is identity's administration, one function per subcommand in
`services/identity/commands.py`. Results go to stdout (one JSON object with `--json`); logs go
to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from libs.common import db
from libs.common.config import SECRET_VARIABLES, SECRETS_OF, ConfigError, Settings, load_settings
from libs.common.logging import configure_logging

if TYPE_CHECKING:
    from aiohttp import web


class ServeError(Exception):
    """A part that cannot start as configured; printed without a traceback."""


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = argparse.ArgumentParser(prog="loopwise-connect", parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run one part of the system")
    serve.add_argument("part", choices=SERVICES)
    serve.add_argument("--port", type=int, help="listen here instead of the configured port")

    migrate = sub.add_parser("migrate", parents=[common], help="apply pending database migrations")
    migrate.add_argument(
        "--demo",
        action="store_true",
        help="then seed the demo schools as `make dev` does (what `make up` runs; not in"
        " production); CONNECT_DEMO_ADMIN_PASSWORD sets the demo admin's password",
    )
    sub.add_parser("dev", parents=[common], help="run the whole system locally (make dev)")
    cluster = sub.add_parser(
        "cluster",
        parents=[common],
        help="run the production topology on this machine (make cluster)",
    )
    cluster.add_argument(
        "--stores-only",
        action="store_true",
        help="only its stores (PostgreSQL behind PgBouncer, Redis Cluster), for the tests",
    )

    _storefront_parser(sub, common)

    schools = sub.add_parser("schools", parents=[common]).add_subparsers(
        dest="action", required=True
    )
    sc = schools.add_parser("create", parents=[common])
    sc.add_argument("--subdomain", required=True)
    sc.add_argument("--name", required=True)
    sc.add_argument("--id", type=int, dest="school_id")
    schools.add_parser("list", parents=[common])
    su = schools.add_parser("update", parents=[common], help="change a school's settings")
    su.add_argument("--school", required=True, help="the school's subdomain or id")
    su.add_argument(
        "--open-registration",
        type=_boolean,
        dest="open_registration",
        metavar="true|false",
        help="whether apps may register themselves at the school (RFC 7591), and whether"
        " apps that registered themselves (the school's and platform apps) may reach it;"
        " false also ends every grant they hold there, at once",
    )

    users = sub.add_parser("users", parents=[common]).add_subparsers(dest="action", required=True)
    uc = users.add_parser("create", parents=[common])
    uc.add_argument("--school", required=True, help="the school's subdomain or id")
    uc.add_argument("--email", required=True)
    uc.add_argument("--password", required=True)
    uc.add_argument("--name")
    uc.add_argument("--role", choices=("admin", "lecturer", "member"), default="member")

    clients = sub.add_parser("clients", parents=[common]).add_subparsers(
        dest="action", required=True
    )
    cc = clients.add_parser("create", parents=[common])
    cc.add_argument("--school", required=True, help="the school's subdomain or id")
    cc.add_argument("--name", required=True)
    cc.add_argument("--redirect-uri", action="append", default=[], dest="redirect_uris")
    cc.add_argument("--public", action="store_true", help="a public client (no secret, PKCE only)")
    cc.add_argument(
        "--scope", default="", help='space-separated, e.g. "courses:read students:read"'
    )
    cc.add_argument("--origin", action="append", default=[], dest="origins")

    keys = sub.add_parser("keys", parents=[common]).add_subparsers(dest="action", required=True)
    kr = keys.add_parser("rotate", parents=[common])
    kr.add_argument("--school", help="the school's subdomain or id; the platform issuer if absent")
    keys.add_parser(
        "rewrap",
        parents=[common],
        help="seal every private key and webhook secret under KEY_ENCRYPTION_KEY (after a"
        " key-encryption key rotation; idempotent, safe while the services run)",
    )
    return p


def _storefront_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """`storefront <action> --school S ...`: one subcommand per storefront action."""
    from services.school_api.storefront.actions import ACTIONS

    storefront = sub.add_parser(
        "storefront",
        parents=[common],
        help="act on a school's storefront (checkout, signup, progress, ...): the school data"
        " changes and events that happen outside the partner API",
        description="What members and buyers do on the school's own site. Each action writes"
        " its rows and its events in one transaction; the school API's outbox relay publishes"
        " the events to webhooks. Ids left out choose a fitting row at random.",
    ).add_subparsers(dest="action", required=True)
    for action in ACTIONS.values():
        ap = storefront.add_parser(
            action.name, parents=[common], help=action.help, description=action.help
        )
        ap.add_argument("--school", required=True, help="the school's subdomain or id")
        for option in action.options:
            flag = f"--{option.name}"
            if option.kind == "flag":
                ap.add_argument(flag, action="store_true", help=option.help)
            else:
                ap.add_argument(
                    flag,
                    type=int if option.kind == "int" else str,
                    default=option.default,
                    help=option.help,
                )


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(result, default=str).decode() + "\n")
        return
    for key, value in result.items():
        if isinstance(value, list):
            sys.stdout.write(f"{key}:\n")
            for item in value:
                sys.stdout.write(f"  - {item}\n")
        else:
            sys.stdout.write(f"{key}: {value}\n")


def _refuse(message: str, as_json: bool) -> int:
    if as_json:
        _emit({"error": message}, True)
    else:
        sys.stderr.write(f"error: {message}\n")
    return 1


def _identity(settings: Settings) -> web.Application:
    from services.identity.app import create_app

    return create_app(settings)


def _gateway(settings: Settings) -> web.Application:
    from services.gateway.app import create_app
    from services.gateway.routetable import RouteTableError

    try:
        return create_app(settings)
    except RouteTableError as exc:
        raise ServeError(f"bad route table: {exc}") from None


def _webhooks(settings: Settings) -> web.Application:
    from services.webhooks.app import create_app
    from services.webhooks.delivery.egress import check_egress

    try:
        check_egress(settings)
    except ConfigError as exc:
        raise ServeError(f"configuration error: {exc}") from None
    return create_app(settings)


def _school_api(settings: Settings) -> web.Application:
    from services.school_api.app import create_app

    return create_app(settings)


# Each part: how its application is made, and the port it listens on unless told otherwise.
_PARTS: dict[str, tuple[Callable[[Settings], web.Application], Callable[[Settings], int]]] = {
    "identity": (_identity, lambda s: s.ports.identity),
    "gateway": (_gateway, lambda s: s.ports.gateway),
    "webhooks": (_webhooks, lambda s: s.ports.webhooks),
    "school-api": (_school_api, lambda s: s.ports.school_api),
}
SERVICES = tuple(_PARTS)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from libs.common import tracing
    from libs.common.web import serve

    make_app, configured_port = _PARTS[args.part]
    # Before the application and its clients are made: they are instrumented as they are.
    tracing.setup(settings.observability, args.part)
    app = make_app(settings)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep serving without it
        pass
    try:
        asyncio.run(serve(app, settings.host, args.port or configured_port(settings)))
    finally:
        tracing.shutdown()
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    if args.demo and not settings.is_development:
        return _refuse("--demo seeds demo schools and admins: never in production", args.json)
    applied = asyncio.run(db.migrate(settings.database_url))
    if not args.demo:
        _emit({"applied": applied}, args.json)
        return 0
    from services.dev import database, seed

    # Beside the development secrets (the containers' volume), else where `make dev` keeps them.
    logins_file = (
        settings.dev_secrets.with_name(seed.LOGINS_FILE.name)
        if settings.dev_secrets is not None
        else seed.LOGINS_FILE
    )
    # Not our own database (it is the compose file's): secrets that are not its own are
    # refused, never started afresh.
    logins = asyncio.run(database.prepare(settings, own_database=False, logins_file=logins_file))
    schools = seed.summary(logins)
    for login in schools:
        if login["school"] == "demo" and settings.demo_admin_password:
            # The caller chose it: not echoed into the container's log.
            login["password"] = "(CONNECT_DEMO_ADMIN_PASSWORD)"
    _emit({"applied": applied, "logins": schools}, args.json)
    return 0


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from services.dev import stack

    return stack.run(settings)


def _cluster(args: argparse.Namespace, settings: Settings) -> int:
    from services.dev import topology

    return topology.run(stores_only=args.stores_only)


def _storefront(args: argparse.Namespace, settings: Settings) -> int:
    """One storefront action (services/school_api/storefront/) against DATABASE_URL."""
    from services.school_api import store
    from services.school_api.storefront import actions

    async def act() -> tuple[int, actions.Outcome]:
        # The school named as every command names it: by id or subdomain (identity's table).
        from services.identity.store import school_by_id, school_by_subdomain

        pool = await store.create_pool(settings=settings, min_size=1, max_size=2)
        try:
            ref = str(args.school)
            school = await (
                school_by_id(pool, int(ref)) if ref.isdigit() else school_by_subdomain(pool, ref)
            )
            if school is None:
                raise actions.StorefrontError(f"no school {ref!r}")
            names = {o.name for o in actions.ACTIONS[args.action].options}
            options = {k: v for k, v in vars(args).items() if k in names}
            return school.id, await actions.run(pool, args.action, school.id, options)
        finally:
            await pool.close()

    try:
        school_id, outcome = asyncio.run(act())
    except actions.StorefrontError as exc:
        return _refuse(str(exc), args.json)
    result: dict[str, Any] = {
        "action": args.action,
        "school_id": school_id,
        "events": outcome.events,
    }
    for name, row in outcome.rows.items():
        result[name] = row if args.json else " ".join(f"{k}={v}" for k, v in row.items())
    _emit(result, args.json)
    return 0


def _administer(args: argparse.Namespace, settings: Settings) -> int:
    """Identity's administration commands (`services/identity/commands.py`)."""
    from services.identity import commands

    options = {k: v for k, v in vars(args).items() if k not in ("command", "action", "json")}
    try:
        result = asyncio.run(commands.run(args.command, args.action, options, settings))
    except commands.CommandError as exc:
        return _refuse(str(exc), args.json)
    _emit(result, args.json)
    return 0


# The commands that are not identity's administration, which takes every other one.
_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "serve": _serve,
    "migrate": _migrate,
    "dev": _dev,
    "cluster": _cluster,
    "storefront": _storefront,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A part is given only the secrets it uses (config.SECRETS_OF): the gateway starts
    # without the key-encryption key and the pepper, the migration without any.
    part = args.part if args.command == "serve" else args.command
    needs = SECRETS_OF.get(part, SECRET_VARIABLES)
    if getattr(args, "demo", False):
        # `migrate --demo` (outside production only) seeds users and keys: every secret.
        needs = SECRET_VARIABLES
    try:
        settings = load_settings(needs=needs)
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    service = {"serve": getattr(args, "part", ""), "storefront": "school-api"}.get(
        args.command, "identity"
    )
    configure_logging(
        settings.log_level,
        service=service,
        trace_ids=args.command == "serve" and settings.observability.tracing,
    )
    try:
        return _COMMANDS.get(args.command, _administer)(args, settings)
    except ServeError as exc:
        return _refuse(str(exc), args.json)
    except ConfigError as exc:
        # Found only once the stores answered (a secret that is not the database's): the same
        # message and status as a bad variable found at load.
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

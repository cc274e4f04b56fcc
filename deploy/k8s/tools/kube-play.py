"""Run an overlay's Deployments under `podman kube play` and wait until every pod is ready.

    make kube-play                       # overlays/dev, torn down afterwards
    .venv-tools/bin/python deploy/k8s/tools/kube-play.py [--overlay dev] [--keep]

What it proves: the rendered pods start with their security context as written (uid 10001,
read-only root with /tmp an emptyDir, every capability dropped, no privilege escalation,
seccomp), each part's own Secret and the shared ConfigMap are all it needs, the migration runs
as a pod of its own first, and every part turns ready (/readyz, as the readiness probe asks);
then the gateway answers discovery and the egress IPs for the platform host.

What podman is not: a cluster. Podman 4.3 plays Pods and Deployments (one replica) and
ConfigMaps; here Secrets become ConfigMaps of the same data, the migration Job a Pod, and
Services the pods' own names on a network of this run (IDENTITY_URL etc. rewritten). It runs
no probes itself (no systemd) and enforces no NetworkPolicy, HPA, PDB or Ingress: the tests of
tests/test_k8s.py check those as written. PostgreSQL and Redis run as pods too.

Images (environment): CONNECT_IMAGE (localhost/loopwise-connect:dev, `make up` builds it),
EGRESS_PROXY_IMAGE (localhost/loopwise-egress-proxy:dev, built here from
deploy/k8s/egress-proxy on BASE_IMAGE when missing), POSTGRES_IMAGE, REDIS_IMAGE (the local
Debian-built ones of deploy/images). CONTAINERS_CONF: deploy/podman/containers.conf.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pykustomize  # type: ignore[import-not-found]
import yaml

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
PORTS = {"identity": 8081, "gateway": 8080, "school-api": 8082, "webhooks": 8083}
PARTS = (*PORTS, "egress-proxy")
# Where each pod has its emptyDir (the root file system is read-only).
TMP = "/tmp"  # noqa: S108

Doc = dict[str, Any]


def log(message: str) -> None:
    sys.stderr.write(f"== kube-play: {message}\n")


def podman(*args: str, check: bool = True, capture: bool = True) -> str:
    result = subprocess.run(["podman", *args], capture_output=capture, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {result.stderr.strip()[-2000:]}")
    return result.stdout if capture else ""


def logs(container: str) -> str:
    return subprocess.run(
        ["podman", "logs", "--tail", "30", container],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ).stdout


def image_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image]).returncode == 0


def render(overlay: Path) -> list[Doc]:
    result = asyncio.run(pykustomize.build(str(overlay)))
    return [d for d in yaml.safe_load_all(result.yaml) if d]


def _stores(run: str, password: str, postgres: str, redis: str) -> list[Doc]:
    def deployment(name: str, image: str, env: list[Doc], args: list[str]) -> Doc:
        container: Doc = {"name": "main", "image": image}
        if env:
            container["env"] = env
        if args:
            container["args"] = args
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": f"{name}-{run}"},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [container]},
                },
            },
        }

    return [
        deployment(
            "connect-postgres",
            postgres,
            [
                {"name": "POSTGRES_PASSWORD", "value": password},
                {"name": "POSTGRES_DB", "value": "loopwise_connect"},
            ],
            [],
        ),
        deployment("connect-redis", redis, [], ["redis-server", "--save", ""]),
    ]


def transform(docs: list[Doc], run: str, images: dict[str, str]) -> tuple[list[Doc], list[Doc]]:
    """(the migration's Pod and what it needs, the Deployments and what they need)."""
    hosts = {f"connect-{part}": f"connect-{part}-{run}-pod-0" for part in PARTS}

    def rehost(value: str) -> str:
        for service, pod in hosts.items():
            value = value.replace(f"//{service}:", f"//{pod}:")
        return value

    configs: list[Doc] = []
    for doc in docs:
        if doc["kind"] in ("ConfigMap", "Secret"):
            data = doc.get("data", {})
            if doc["kind"] == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in data.items()}
            configs.append(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": doc["metadata"]["name"]},
                    "data": {k: rehost(v) for k, v in data.items()},
                }
            )

    def pod_spec(template: Doc) -> Doc:
        spec = copy.deepcopy(template["spec"])
        for key in ("serviceAccountName", "topologySpreadConstraints", "nodeSelector"):
            spec.pop(key, None)
        for container in spec["containers"]:
            # Podman 4.3 publishes every containerPort on the host's same port (Kubernetes
            # does not): the pods are reached on their own addresses instead, and probes name
            # the port by number.
            named = {p["name"]: p["containerPort"] for p in container.pop("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                for action in container.get(probe, {}).values():
                    if isinstance(action, dict) and action.get("port") in named:
                        action["port"] = named[action["port"]]
            image = container["image"].split(":")[0]
            container["image"] = images[image]
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    source["configMapRef"] = source.pop("secretRef")
            for variable in container.get("env", []):
                if "value" in variable:
                    variable["value"] = rehost(variable["value"])
        return spec

    migration: list[Doc] = []
    deployments: list[Doc] = []
    for doc in docs:
        if doc["kind"] == "Job":
            spec = pod_spec(doc["spec"]["template"])
            spec["restartPolicy"] = "Never"
            migration.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": f"{doc['metadata']['name']}-{run}",
                        "labels": doc["spec"]["template"]["metadata"]["labels"],
                    },
                    "spec": spec,
                }
            )
        elif doc["kind"] == "Deployment":
            played = copy.deepcopy(doc)
            played["metadata"] = {"name": f"{doc['metadata']['name']}-{run}"}
            played["spec"].pop("strategy", None)
            played["spec"]["replicas"] = 1
            played["spec"]["template"]["spec"] = pod_spec(doc["spec"]["template"])
            deployments.append(played)
    return configs + migration, configs + deployments


def container_of(pod: str) -> Doc:
    """The application container of a played pod (not its infra container)."""
    ids = podman("ps", "-a", "-q", "--filter", f"pod={pod}", "--no-trunc").split()
    for found in json.loads(podman("inspect", *ids)):
        if not found.get("IsInfra"):
            inspected: Doc = found
            return inspected
    raise RuntimeError(f"no container in pod {pod}")


class PodFailed(Exception):
    """A container exited or was restarted: it will not turn ready by waiting."""


def running(container_id: str) -> bool:
    (state,) = json.loads(podman("inspect", container_id))
    if state["State"]["Status"] != "running" or state.get("RestartCount", 0) > 0:
        raise PodFailed(
            f"{state['Name']}: {state['State']['Status']}, restarted "
            f"{state.get('RestartCount', 0)} times:\n{logs(container_id)}"
        )
    return True


def wait_until(seconds: float, what: str, check: Any) -> float:
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (OSError, RuntimeError, urllib.error.URLError):
            pass
        if time.monotonic() - started > seconds:
            raise TimeoutError(f"{what}: not after {seconds:g} s")
        time.sleep(0.5)


def http_status(url: str, host: str | None = None) -> int:
    # Always http:// to a pod's address on this run's network.
    request = urllib.request.Request(url, headers={"Host": host} if host else {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=3) as response:  # noqa: S310
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def address(container: Doc, network: str) -> str:
    ip: str = container["NetworkSettings"]["Networks"][network]["IPAddress"]
    return ip


def security_of(container: Doc) -> Doc:
    config, host = container["Config"], container["HostConfig"]
    names = {item.split("=", 1)[0] for item in config.get("Env") or []}
    mounts = container.get("Mounts", [])
    return {
        "user": config.get("User"),
        "effective_capabilities": container.get("EffectiveCaps") or [],
        "secrets_held": sorted(names & {"KEY_ENCRYPTION_KEY", "SECRET_PEPPER", "INTERNAL_TOKEN"}),
        "read_only_root": host.get("ReadonlyRootfs"),
        "capabilities_added": host.get("CapAdd") or [],
        "no_new_privileges": any("no-new-privileges" in o for o in host.get("SecurityOpt") or []),
        "tmp": next((m.get("Type") for m in mounts if m["Destination"] == TMP), None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overlay", default="dev")
    parser.add_argument("--keep", action="store_true", help="leave the pods running")
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    conf = ROOT / "deploy" / "podman" / "containers.conf"
    if "CONTAINERS_CONF" not in os.environ and conf.exists():
        os.environ["CONTAINERS_CONF"] = str(conf)
    images = {
        "loopwise/connect": os.environ.get("CONNECT_IMAGE", "localhost/loopwise-connect:dev"),
        "loopwise/egress-proxy": os.environ.get(
            "EGRESS_PROXY_IMAGE", "localhost/loopwise-egress-proxy:dev"
        ),
    }
    postgres = os.environ.get("POSTGRES_IMAGE", "localhost/loopwise-connect-postgres:15")
    redis = os.environ.get("REDIS_IMAGE", "localhost/loopwise-connect-redis:7")
    for image in (images["loopwise/connect"], postgres, redis):
        if not image_exists(image):
            log(f"image {image} is missing (make up builds it)")
            return 3
    started = time.monotonic()
    if not image_exists(images["loopwise/egress-proxy"]):
        base = os.environ.get("BASE_IMAGE", "localhost/loopwise-connect-base:bookworm")
        log(f"building {images['loopwise/egress-proxy']} on {base}")
        podman(
            "build", "--network", "host", "--format", "docker", "--build-arg",
            f"BASE_IMAGE={base}", "-t", images["loopwise/egress-proxy"],
            str(K8S / "egress-proxy"),
        )  # fmt: skip
    run = f"kp{secrets.token_hex(3)}"
    network = f"connect-{run}"
    password = secrets.token_urlsafe(16)
    work = Path(tempfile.mkdtemp(prefix="kube-play-"))
    files: list[Path] = []
    result: Doc = {"overlay": args.overlay, "run": run}
    try:
        shutil.copytree(K8S, work / "k8s", ignore=shutil.ignore_patterns("secrets"))
        shutil.copytree(K8S / "secrets", work / "k8s" / "secrets")
        overlay = work / "k8s" / "overlays" / args.overlay
        shutil.rmtree(overlay / "secrets", ignore_errors=True)
        subprocess.run(
            [
                # The project's environment: make-secrets reads libs/common/config.py.
                str(ROOT / ".venv" / "bin" / "python"), str(K8S / "tools" / "make-secrets.py"),
                str(overlay),
                "--database-url",
                f"postgresql://postgres:{password}@connect-postgres-{run}-pod-0:5432/loopwise_connect",
                "--redis-url", f"redis://connect-redis-{run}-pod-0:6379/0",
            ],
            check=True,
        )  # fmt: skip
        migration, deployments = transform(render(overlay), run, images)
        stores = _stores(run, password, postgres, redis)
        for name, docs in (("stores", stores), ("migrate", migration), ("parts", deployments)):
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
            files.append(path)
        podman("network", "create", network)

        step = time.monotonic()
        podman("kube", "play", "--network", network, str(files[0]))
        pg, rd = (
            container_of(f"connect-postgres-{run}-pod-0"),
            container_of(f"connect-redis-{run}-pod-0"),
        )
        wait_until(60, "PostgreSQL", lambda: podman("exec", pg["Id"], "pg_isready", "-q") == "")
        wait_until(30, "Redis", lambda: "PONG" in podman("exec", rd["Id"], "redis-cli", "ping"))
        result["stores_ready_s"] = round(time.monotonic() - step, 1)

        step = time.monotonic()
        podman("kube", "play", "--network", network, str(files[1]))
        (job,) = [d["metadata"]["name"] for d in migration if d["kind"] == "Pod"]
        migrate = container_of(job)
        code = podman("wait", migrate["Id"]).strip()
        if code != "0":
            raise RuntimeError(f"migration exited {code}: {logs(migrate['Id'])}")
        result["migration"] = {"exit": 0, "s": round(time.monotonic() - step, 1)}
        result["migration"]["security"] = security_of(container_of(job))

        step = time.monotonic()
        podman("kube", "play", "--network", network, str(files[2]))
        pods: Doc = {}
        for part in PARTS:
            container = container_of(f"connect-{part}-{run}-pod-0")
            ip = address(container, network)
            if part in PORTS:
                url = f"http://{ip}:{PORTS[part]}"
                ready = wait_until(
                    args.timeout,
                    part,
                    lambda url=url, cid=container["Id"]: (
                        running(cid) and http_status(url + "/readyz") == 200
                    ),
                )
                live = http_status(url + "/healthz")
            else:

                def accepts(ip: str = ip) -> bool:
                    with socket.create_connection((ip, 8888), timeout=2):
                        return True

                ready, live = wait_until(args.timeout, part, accepts), 200
            pods[part] = {
                "ready_after_s": round(time.monotonic() - step, 1),
                "waited_s": round(ready, 1),
                "healthz": live,
                "security": security_of(container_of(f"connect-{part}-{run}-pod-0")),
            }
        result["pods"] = pods
        gateway = address(container_of(f"connect-gateway-{run}-pod-0"), network)
        config = next(d for d in deployments if d["metadata"]["name"].startswith("connect-config"))
        platform = config["data"]["PLATFORM_URL"].removeprefix("https://")
        result["through_the_gateway"] = {
            "/.well-known/openid-configuration": http_status(
                f"http://{gateway}:8080/.well-known/openid-configuration", platform
            ),
            "/v1/webhooks/egress-ips": http_status(
                f"http://{gateway}:8080/v1/webhooks/egress-ips", platform
            ),
        }
        result["total_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(result))
        return 0
    except (RuntimeError, TimeoutError, PodFailed) as exc:
        log(str(exc))
        for part in PARTS:
            pod = f"connect-{part}-{run}-pod-0"
            with contextlib.suppress(RuntimeError):
                log(f"logs of {pod}:\n{logs(container_of(pod)['Id'])}")
        return 1
    finally:
        if not args.keep:
            for path in reversed(files):
                podman("kube", "down", str(path), check=False)
            podman("network", "rm", "-f", network, check=False)
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept: podman kube down {' '.join(map(str, files))}")


if __name__ == "__main__":
    raise SystemExit(main())

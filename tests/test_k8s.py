"""deploy/k8s, rendered by kustomize (base, dev and prod) and checked as a reviewer would:
kubernetes-validate --strict, checkov, Pod Security "restricted", least-privilege Secrets,
NetworkPolicies that make TRUST_FORWARDED_HOST safe, probes and drain, a migration Job per
release, and every part's environment loading as the services load it.

The tools live in .venv-tools (`make tools`: checkov's pins never meet ours); the first run
here makes it (a few minutes), later runs take ~30 s, most of it checkov.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from libs.common.config import SECRETS_OF, load_settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
TOOLS = ROOT / ".venv-tools"
TARGETS = ("base", "overlays/dev", "overlays/prod")
OVERLAYS = ("overlays/dev", "overlays/prod")
PARTS = ("identity", "gateway", "school-api", "webhooks")
# identity's peak RSS under a burst of 64 sign-ins at once (4 argon2 checks at a time, 64 MiB
# each), measured by deploy/k8s/tools/identity-memory.py: its memory limit must stay above it,
# with room, and its request cover it.
IDENTITY_PEAK_MIB = 332
# libs/common/web.serve's drain: in-flight requests get this long after SIGTERM.
SERVER_DRAIN_SECONDS = 20

Doc = dict[str, Any]

# The first run makes .venv-tools (checkov and its pins: a few minutes on a shared machine).
pytestmark = pytest.mark.timeout(900)


def _tools() -> Path:
    if not (TOOLS / ".installed").exists():
        made = subprocess.run(["make", "tools"], cwd=ROOT, capture_output=True, text=True)
        assert made.returncode == 0, made.stderr[-4000:]
    return TOOLS / "bin"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each target rendered into a file, from a copy of deploy/k8s with development secrets."""
    tools = _tools()
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("secrets"))
    shutil.copytree(K8S / "secrets", copy / "secrets")
    for overlay in OVERLAYS:
        shutil.rmtree(copy / overlay / "secrets", ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                str(K8S / "tools" / "make-secrets.py"),
                str(copy / overlay),
                "--database-url",
                "postgresql://connect@10.0.64.5:5432/loopwise_connect",
                "--redis-url",
                "redis://10.0.64.6:6379/0",
            ],
            check=True,
        )
    out = {}
    for target in TARGETS:
        result = subprocess.run(
            [str(tools / "python"), str(K8S / "tools" / "render.py"), str(copy / target)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        path = copy.parent / (target.replace("/", "-") + ".yaml")
        path.write_text(result.stdout)
        out[target] = path
    return out


def _docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def prod(rendered: dict[str, Path]) -> list[Doc]:
    return _docs(rendered["overlays/prod"])


def _overlay_docs(rendered: dict[str, Path]) -> Iterator[tuple[str, list[Doc]]]:
    for overlay in OVERLAYS:
        yield overlay, _docs(rendered[overlay])


def _named(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _workloads(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "Job", "CronJob")}


def _pod(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def _part(name: str) -> str:
    """connect-school-api -> school-api; connect-migrate-0-1-0 -> migrate."""
    part = name.removeprefix("connect-")
    return "migrate" if part.startswith("migrate") else part


def test_every_manifest_validates_strictly(rendered: dict[str, Path]) -> None:
    """kubernetes-validate --strict accepts every resource of every target: no unknown field,
    no missing one, against the Kubernetes schemas it ships (1.37)."""
    tools = _tools()
    for target, path in rendered.items():
        result = subprocess.run(
            [str(tools / "kubernetes-validate"), "--strict", str(path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{target}:\n{result.stdout}{result.stderr}"
        passed = re.findall(r"passed for resource (\S+)", result.stdout)
        assert len(passed) == len(_docs(path)), result.stdout


def test_checkov_passes_every_check_but_the_three_decided(rendered: dict[str, Path]) -> None:
    """checkov's Kubernetes checks pass on every target, but the three deploy/k8s/checkov.yaml
    skips with its reasons; among those run, the security context's."""
    tools = _tools()
    args = [str(tools / "checkov"), "--config-file", str(K8S / "checkov.yaml"), "-o", "json"]
    for path in rendered.values():
        args += ["-f", str(path)]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        (c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]
    ]
    assert failed == [], failed
    passed = {c["check_id"] for r in reports for c in r["results"]["passed_checks"]}
    security_context = {
        "CKV_K8S_20",  # allowPrivilegeEscalation false
        "CKV_K8S_22",  # read-only root filesystem
        "CKV_K8S_23",  # not root (runAsNonRoot)
        "CKV_K8S_28",  # NET_RAW dropped
        "CKV_K8S_37",  # capabilities minimised
        "CKV_K8S_31",  # seccomp RuntimeDefault
        "CKV_K8S_38",  # no service account token
        "CKV_K8S_40",  # a high UID
        "CKV_K8S_8",  # liveness probe
        "CKV_K8S_9",  # readiness probe
        "CKV_K8S_11",  # CPU limits
        "CKV_K8S_13",  # memory limits
    }
    assert security_context <= passed, security_context - passed
    assert result.returncode == 0, result.stderr[-2000:]


def test_pods_meet_pod_security_restricted(rendered: dict[str, Path]) -> None:
    """Every pod of every target: non-root uid 10001, no privilege escalation, every
    capability dropped, seccomp RuntimeDefault, read-only root with an emptyDir for /tmp,
    no host namespaces or paths, and an own ServiceAccount that mounts no API token."""
    for target, path in rendered.items():
        docs = _docs(path)
        accounts = _named(docs, "ServiceAccount")
        used: list[str] = []
        for name, workload in _workloads(docs).items():
            pod = _pod(workload)
            where = f"{target}: {name}"
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] == 10001, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            assert all(set(v) - {"name"} <= {"emptyDir", "configMap"} for v in volumes.values())
            assert pod["automountServiceAccountToken"] is False, where
            account = pod["serviceAccountName"]
            assert accounts[account]["automountServiceAccountToken"] is False, where
            used.append(account)
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"] == {"drop": ["ALL"]}, where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, where
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
                assert not sc.get("privileged"), where
                (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert "emptyDir" in volumes[tmp["name"]], where
                assert set(container["resources"]["limits"]) == {"cpu", "memory"}, where
                assert set(container["resources"]["requests"]) == {"cpu", "memory"}, where
        assert len(used) == len(set(used)), f"{target}: a ServiceAccount shared: {used}"


def _mib(quantity: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return float(quantity.removesuffix(unit)) * factor
    return int(quantity) / 2**20


def test_services_probe_drain_scale_and_budget(prod: list[Doc]) -> None:
    """Each part: startup, readiness (/readyz) and liveness (/healthz) probes; a preStop pause
    and a grace period that covers it and the server's drain; an HPA and a PDB; identity's
    memory limit above its measured sign-in burst peak."""
    deployments = _named(prod, "Deployment")
    hpas = {
        d["spec"]["scaleTargetRef"]["name"] for d in prod if d["kind"] == "HorizontalPodAutoscaler"
    }
    pdbs = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for d in prod
        if d["kind"] == "PodDisruptionBudget"
    }
    for part in PARTS:
        name = f"connect-{part}"
        pod = _pod(deployments[name])
        (container,) = pod["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz", name
        pause = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pause[0] == "sleep", name
        assert pod["terminationGracePeriodSeconds"] > int(pause[1]) + SERVER_DRAIN_SECONDS, name
        assert name in hpas and name in pdbs, name
        strategy = deployments[name]["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0, name
    (identity,) = _pod(deployments["connect-identity"])["containers"]
    assert _mib(identity["resources"]["limits"]["memory"]) > IDENTITY_PEAK_MIB * 1.2
    assert _mib(identity["resources"]["requests"]["memory"]) >= IDENTITY_PEAK_MIB


def _secret_refs(container: Doc) -> set[str]:
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    for variable in container.get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs.add(ref["name"])
    return refs


def test_each_part_is_given_only_its_own_secrets(rendered: dict[str, Path]) -> None:
    """One Secret per part, holding exactly what the part uses (config.SECRETS_OF): the
    gateway no key-encryption key and no pepper, the migration only DATABASE_URL; no secret
    variable in a ConfigMap."""
    for overlay, docs in _overlay_docs(rendered):
        secrets = _named(docs, "Secret")
        for name, workload in _workloads(docs).items():
            part = _part(name)
            if part == "egress-proxy":
                assert not any(_secret_refs(c) for c in _pod(workload)["containers"])
                continue
            (container,) = _pod(workload)["containers"]
            (ref,) = _secret_refs(container)
            assert ref.startswith(f"connect-{part}-"), (overlay, name, ref)
            keys = set(secrets[ref]["data"])
            stores = {"DATABASE_URL"} if part == "migrate" else {"DATABASE_URL", "REDIS_URL"}
            assert keys == stores | SECRETS_OF[part], (overlay, name, keys)
        gateway = next(s for n, s in secrets.items() if n.startswith("connect-gateway-"))
        assert not {"KEY_ENCRYPTION_KEY", "SECRET_PEPPER"} & set(gateway["data"])
        for config in _named(docs, "ConfigMap").values():
            assert not set(config["data"]) & (SECRETS_OF["identity"] | {"DATABASE_URL"})


def _environment(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The environment Kubernetes gives a container: envFrom in order, then env."""
    import base64

    configs, secrets = _named(docs, "ConfigMap"), _named(docs, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configs[source["configMapRef"]["name"]]["data"])
        else:
            data = secrets[source["secretRef"]["name"]]["data"]
            env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
    env.update({v["name"]: v["value"] for v in container.get("env", []) if "value" in v})
    return env


def test_every_part_starts_with_the_environment_it_is_given(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    """The configuration each container gets (ConfigMap, Secret, env) loads as the CLI loads
    it for that part: production, nothing missing, nothing malformed, and webhooks sending
    through the egress proxy's Service."""
    for overlay, docs in _overlay_docs(rendered):
        services = _named(docs, "Service")
        for name, workload in _workloads(docs).items():
            part = _part(name)
            if part == "egress-proxy":
                continue
            (container,) = _pod(workload)["containers"]
            env = _environment(docs, container)
            env["CONNECT_DEV_SECRETS"] = str(tmp_path / "never-written")
            settings = load_settings(env, needs=SECRETS_OF[part])
            assert settings.environment == "production", (overlay, name)
            assert settings.host == "0.0.0.0", (overlay, name)
            if part == "webhooks":
                proxy = settings.webhooks.egress_proxy or ""
                match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", proxy)
                assert match, proxy
                service = services[match[1]]
                assert service["spec"]["selector"] == {
                    "app.kubernetes.io/name": "connect-egress-proxy"
                }
                assert int(match[2]) in [p["port"] for p in service["spec"]["ports"]]
            for upstream in ("IDENTITY_URL", "SCHOOL_API_URL", "WEBHOOKS_URL"):
                host, port = env[upstream].removeprefix("http://").split(":")
                assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
        assert not (tmp_path / "never-written").exists()


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _pod_labels(docs: list[Doc]) -> dict[str, dict[str, str]]:
    return {
        _part(name): w["spec"]["template"]["metadata"]["labels"]
        for name, w in _workloads(docs).items()
    }


def _peers(policies: list[Doc], labels: dict[str, str], direction: str) -> list[Doc]:
    """Every `from` (ingress) or `to` (egress) peer of the policies that select a pod."""
    peers: list[Doc] = []
    key = "from" if direction == "ingress" else "to"
    for policy in policies:
        spec = policy["spec"]
        if direction.capitalize() not in spec["policyTypes"]:
            continue
        if not _selects(spec["podSelector"], labels):
            continue
        for rule in spec.get(direction, []):
            peers += rule.get(key, [])
    return peers


def _parts_among(peers: list[Doc], pods: dict[str, dict[str, str]]) -> set[str]:
    found = set()
    for peer in peers:
        if "namespaceSelector" in peer:
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            found.add(f"namespace:{namespace}")
        elif "ipBlock" in peer:
            found.add("ipBlock")
        else:
            found |= {p for p, labels in pods.items() if _selects(peer["podSelector"], labels)}
    return found


def _reaches_public(peers: list[Doc], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    for peer in peers:
        block = peer.get("ipBlock")
        if not block or ipaddress.ip_network(block["cidr"]).version != ip.version:
            continue
        if ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", [])
        ):
            return True
    return False


def test_network_policies_admit_only_the_designed_paths(rendered: dict[str, Path]) -> None:
    """Default deny; the ingress controller reaches the gateway alone; identity and the school
    API only the gateway; webhooks the gateway and identity; only the egress proxy reaches the
    internet (and no private network); TRUST_FORWARDED_HOST only where no other pod can send."""
    for target, path in rendered.items():
        docs = _docs(path)
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        (deny,) = [
            p
            for p in policies
            if p["spec"]["podSelector"] == {}
            and "ingress" not in p["spec"]
            and "egress" not in p["spec"]
        ]
        assert sorted(deny["spec"]["policyTypes"]) == ["Egress", "Ingress"], target
        pods = _pod_labels(docs)
        # Prometheus (namespace monitoring) scrapes each part's /metrics.
        scraped = "namespace:monitoring"
        expected_ingress = {
            "gateway": {"namespace:ingress-nginx", scraped},
            "identity": {"gateway", scraped},
            "school-api": {"gateway", scraped},
            "webhooks": {"gateway", "identity", scraped},
            "egress-proxy": {"webhooks"},
            "migrate": set(),
        }
        for part, labels in pods.items():
            got = _parts_among(_peers(policies, labels, "ingress"), pods)
            assert got == expected_ingress[part], (target, part, got)
            egress = _peers(policies, labels, "egress")
            public = _reaches_public(egress, "93.184.216.34") or _reaches_public(
                egress, "2606:2800:220:1::1"
            )
            assert public == (part == "egress-proxy"), (target, part)
            for private in ("10.1.2.3", "169.254.169.254", "172.16.0.1", "192.168.1.1"):
                if part == "egress-proxy":
                    assert not _reaches_public(egress, private), (target, private)
        for name, workload in _workloads(docs).items():
            part = _part(name)
            for container in _pod(workload)["containers"]:
                env = {v["name"]: v.get("value") for v in container.get("env", [])}
                if env.get("TRUST_FORWARDED_HOST") == "true":
                    trusted = {"gateway", "identity", scraped}
                    assert expected_ingress[part] <= trusted, (target, name)
                    got = _parts_among(_peers(policies, pods[part], "ingress"), pods)
                    assert "gateway" in got and got <= trusted, (target, name)
            if part == "gateway":
                (container,) = _pod(workload)["containers"]
                env = {v["name"]: v.get("value") for v in container.get("env", [])}
                assert env.get("TRUST_FORWARDED_HOST", "false") == "false"


def test_a_migration_job_per_release(rendered: dict[str, Path]) -> None:
    """The migration Job's name carries the release (the image's tag), so each release applies
    a new one; it retries a bounded number of times and is cleaned up after a day."""
    for overlay, docs in _overlay_docs(rendered):
        (job,) = [d for d in docs if d["kind"] == "Job"]
        (container,) = _pod(job)["containers"]
        tag = container["image"].rsplit(":", 1)[1]
        assert job["metadata"]["name"] == f"connect-migrate-{tag.replace('.', '-')}", overlay
        assert container["args"] == ["migrate"]
        assert 0 < job["spec"]["backoffLimit"] <= 6
        assert job["spec"]["ttlSecondsAfterFinished"] > 0
        images = {c["image"] for w in _workloads(docs).values() for c in _pod(w)["containers"]}
        assert {i for i in images if i.startswith("loopwise/connect:")} == {container["image"]}


def test_the_release_first_step_holds_the_migration_and_all_it_needs(
    rendered: dict[str, Path],
) -> None:
    """`kubectl apply -l connect.loopwise.com/migration=true` (README "Kubernetes") applies the
    migration Job with every object it refers to and the policies that let it reach the
    stores, and no Deployment (they roll in the second step, once the Job completed)."""
    for overlay, docs in _overlay_docs(rendered):
        step = [
            d
            for d in docs
            if d["metadata"].get("labels", {}).get("connect.loopwise.com/migration") == "true"
        ]
        names = {(d["kind"], d["metadata"]["name"]) for d in step}
        (job,) = [d for d in step if d["kind"] == "Job"]
        pod = _pod(job)
        needed = {("ServiceAccount", pod["serviceAccountName"])}
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    needed.add(("ConfigMap", source["configMapRef"]["name"]))
                else:
                    needed.add(("Secret", source["secretRef"]["name"]))
        assert needed <= names, (overlay, needed - names)
        assert not [d for d in step if d["kind"] == "Deployment"], overlay
        policies = [d for d in step if d["kind"] == "NetworkPolicy"]
        labels = job["spec"]["template"]["metadata"]["labels"]
        stores = [p for p in _peers(policies, labels, "egress") if "ipBlock" in p]
        assert stores, (overlay, "the migration's step has no policy to reach the stores")


def test_the_ingress_serves_every_school_and_the_platform_over_tls(
    rendered: dict[str, Path],
) -> None:
    """The Ingress's hosts are the ConfigMap's school origins (`*.`) and platform host, TLS
    covers each, and every path goes to the gateway."""
    for overlay, docs in _overlay_docs(rendered):
        (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
        (config,) = [
            c for n, c in _named(docs, "ConfigMap").items() if n.startswith("connect-config")
        ]
        school = config["data"]["PUBLIC_URL_TEMPLATE"].removeprefix("https://")
        platform = config["data"]["PLATFORM_URL"].removeprefix("https://")
        hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
        assert hosts == {school.replace("{school}", "*"), platform}, overlay
        tls = {h for entry in ingress["spec"]["tls"] for h in entry["hosts"]}
        assert hosts <= tls, overlay
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] == "connect-gateway"


@pytest.mark.skipif(shutil.which("podman") is None, reason="no podman here")
@pytest.mark.timeout(1500)  # the first run builds the base images and the application's
def test_the_pods_turn_ready_under_podman_kube_play() -> None:
    """`make kube-play`: the dev overlay's pods, built from this checkout, start under Podman
    with their security context as written and turn ready; each holds only its own secrets;
    the gateway reaches identity and webhooks. A minute or two, most of it the image build
    (layers cached after the first)."""
    if not (ROOT / "deploy" / "up.sh").exists():
        pytest.skip("no image build here (deploy/up.sh)")
    result = subprocess.run(
        ["make", "--no-print-directory", "kube-play"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["migration"]["exit"] == 0
    held = {
        "identity": ["INTERNAL_TOKEN", "KEY_ENCRYPTION_KEY", "SECRET_PEPPER"],
        "gateway": ["INTERNAL_TOKEN"],
        "school-api": ["INTERNAL_TOKEN", "SECRET_PEPPER"],
        "webhooks": ["INTERNAL_TOKEN", "KEY_ENCRYPTION_KEY"],
        "egress-proxy": [],
    }
    assert set(report["pods"]) == set(held)
    for part, pod in [*report["pods"].items(), ("migrate", report["migration"])]:
        security = pod["security"]
        assert security["user"] == "10001:10001", part
        assert security["read_only_root"] is True, part
        assert security["no_new_privileges"] is True, part
        assert security["effective_capabilities"] == [], part
        assert security["secrets_held"] == held.get(part, []), part
    for part, pod in report["pods"].items():
        assert pod["healthz"] == 200, part
    assert set(report["through_the_gateway"].values()) == {200}, report

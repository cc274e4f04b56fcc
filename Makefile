# Loopwise Connect: `make dev` runs the whole system, `make test` runs every test.
# Both work on a fresh machine with Python 3.11: they make a virtual environment in .venv
# from the hashed lock file first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev cluster test-cluster test lint format lock up down bench bench-quick faults clean install \
	tools lock-tools k8s-check kube-play

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# The manifest checks' tools (deploy/k8s/tools.in): kustomize (pykustomize), kubernetes-validate
# and checkov, in an environment of their own so checkov's pins never meet ours.
TOOLS       := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): requirements.tools.lock deploy/k8s/kustomize.lock
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.tools.lock
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
		--ignore-requires-python -r deploy/k8s/kustomize.lock
	@touch $@

# requirements.tools.lock from deploy/k8s/tools.in (needs uv, as `make lock`).
lock-tools:
	uv pip compile deploy/k8s/tools.in --python-version 3.11 --generate-hashes --quiet \
		-o requirements.tools.lock

# deploy/k8s rendered (base, dev, prod) and checked: kubernetes-validate --strict, checkov,
# Pod Security "restricted", least-privilege secrets, network policies (tests/test_k8s.py).
k8s-check: $(STAMP) tools
	$(BIN)/python -m pytest -q tests/test_k8s.py

# deploy/k8s's dev overlay under `podman kube play` (README "Kubernetes"): the application image
# built as `make up` builds it (deploy/up.sh images), then every pod started and waited for until
# ready (PostgreSQL and Redis as pods too), and torn down. About 30 s once the images exist.
KUBE_PLAY_IMAGE ?= localhost/loopwise-connect:kube-play
kube-play: $(STAMP) tools
	CONTAINER_ENGINE=podman CONNECT_IMAGE=$(KUBE_PLAY_IMAGE) deploy/up.sh images
	CONNECT_IMAGE=$(KUBE_PLAY_IMAGE) $(TOOLS)/bin/python deploy/k8s/tools/kube-play.py

dev: $(STAMP)
	$(BIN)/loopwise-connect dev

# The production topology on this machine (README "Production topology"): nginx on 8080 in front
# of two processes of each service, Redis Cluster, PostgreSQL behind PgBouncer; Ctrl-C stops it.
cluster: $(STAMP)
	$(BIN)/loopwise-connect cluster

test: $(STAMP)
	$(BIN)/python -m pytest

# The whole suite on the production topology's stores: PostgreSQL through PgBouncer in
# transaction pooling (its own server) and Redis Cluster (3 primaries, 3 replicas), on free
# ports, stores only (no service processes, no nginx: the tests serve their own services; the
# topology's own tests, tests/test_cluster.py, start a whole one), stopped afterwards. About
# 10 minutes on a shared 2-core machine; CLUSTER_TESTS=tests/test_x.py for fewer.
CLUSTER_TESTS ?= tests
test-cluster: $(STAMP)
	$(BIN)/python -m services.dev.topology test -q $(CLUSTER_TESTS)

# Benchmarks (bench/README.md): the full run (under 10 minutes, with the node-oidc peer) and the
# quick one (under 90 seconds). Each starts its own processes on its own ports and database.
bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

# The fault suite (faults/README.md): the production topology under steady load, one fault at a
# time, what each cost. Under 10 minutes; `FAULTS_ARGS="--only kill-gateway"` for a quick look.
faults: $(STAMP)
	$(BIN)/python -m faults $(FAULTS_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check libs services tests bench faults
	$(BIN)/ruff format --check libs services tests bench faults
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format libs services tests bench faults
	$(BIN)/ruff check --fix libs services tests bench faults

# Regenerate requirements.lock from pyproject.toml (needs uv: `pip install uv`), and
# requirements.runtime.lock, the runtime dependencies alone, which the container image installs,
# at the versions requirements.lock has (what the tests ran with).
lock:
	uv pip compile pyproject.toml --extra devstores --extra test --extra lint --extra compose \
		--python-version 3.11 --generate-hashes --quiet -o requirements.lock \
		--no-emit-package loopwise-connect
	uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--generate-hashes --quiet -o requirements.runtime.lock --no-emit-package loopwise-connect \
		-c requirements.lock

# The whole system in containers (README "Containers"): CONTAINER_ENGINE=docker|podman,
# CONNECT_DEMO_ADMIN_PASSWORD for the demo admin, CONNECT_HTTP_PORT (8080); deploy/up.sh says
# the rest. It returns once the gateway answers; `make down` stops it.
up: $(STAMP)
	deploy/up.sh up

down: $(STAMP)
	deploy/up.sh down

clean:
	rm -rf $(VENV) $(TOOLS) .data .pytest_cache .mypy_cache .ruff_cache

"""Render a kustomization with kustomize's own library (pykustomize, in .venv-tools).

    .venv-tools/bin/python deploy/k8s/tools/render.py deploy/k8s/overlays/prod > prod.yaml

The same output as `kustomize build` / `kubectl kustomize` of kustomize v5 (overlays/*/secrets
must exist: deploy/k8s/tools/make-secrets.py).
"""

from __future__ import annotations

import asyncio
import sys

import pykustomize  # type: ignore[import-not-found]


def main() -> int:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: render.py KUSTOMIZATION_DIR\n")
        return 2
    try:
        result = asyncio.run(pykustomize.build(sys.argv[1]))
    except pykustomize.KustomizeError as exc:
        sys.stderr.write(f"kustomize: {exc}\n")
        return 1
    sys.stdout.write(result.yaml)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write a development set of per-part secrets for a deploy/k8s overlay.

    python deploy/k8s/tools/make-secrets.py deploy/k8s/overlays/dev \
        --database-url postgresql://... --redis-url redis://...

Fresh random KEY_ENCRYPTION_KEY, SECRET_PEPPER and INTERNAL_TOKEN, each written only into the
files of the parts that use them (libs/common/config.py SECRETS_OF), mode 0600. An existing
set is kept (its keys sealed the database's data): --force replaces it.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from libs.common.config import SECRETS_OF  # noqa: E402

PARTS = ("identity", "gateway", "school-api", "webhooks", "migrate")


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overlay", type=Path)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    folder = args.overlay / "secrets"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    values = {
        "KEY_ENCRYPTION_KEY": _key(),
        "SECRET_PEPPER": _key(),
        "INTERNAL_TOKEN": secrets.token_urlsafe(32),
    }
    existing = [part for part in PARTS if (folder / f"{part}.env").exists()]
    if existing and not args.force:
        if len(existing) == len(PARTS):
            return 0
        sys.stderr.write(f"{folder} holds a partial set ({', '.join(existing)}): --force\n")
        return 1
    for part in PARTS:
        path = folder / f"{part}.env"
        lines = [f"DATABASE_URL={args.database_url}"]
        if part != "migrate":
            lines.append(f"REDIS_URL={args.redis_url}")
        lines += [f"{name}={values[name]}" for name in sorted(SECRETS_OF[part])]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

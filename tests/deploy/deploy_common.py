"""Constants shared by the deployment checks (tests/deploy); fixtures are in conftest.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "docker"

# The schemas every rendered object is validated against. kubectl here is 1.32;
# raise both together, deliberately.
KUBERNETES_VERSION = "1.32.0"

# Everything a user can `kubectl apply -k`.
SERVER_TARGETS = ("overlays/single-gpu", "overlays/tp2", "overlays/single-gpu-servicemonitor")
ALL_TARGETS = SERVER_TARGETS + ("jobs/model-download",)

# The product's ports: OpenAI API + /health + vLLM's /metrics; the plugin's exporter.
API_PORT = 8000
KVCOMP_METRICS_PORT = 9464


def _load_fetch_kubectl():
    spec = importlib.util.spec_from_file_location(
        "vllm_kvcomp_fetch_kubectl", REPO / "deploy" / "tools" / "fetch_kubectl.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# deploy/tools/fetch_kubectl.py: finds (or fetches) a kubectl with kustomize v5+.
fetch_kubectl = _load_fetch_kubectl()

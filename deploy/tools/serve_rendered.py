#!/usr/bin/env python3
"""Run the server container's command from a rendered overlay on a GPU host, without Kubernetes.

Takes the Deployment and ConfigMap that `kubectl kustomize deploy/k8s/overlays/X` renders, and
starts exactly its `vllm serve` arguments (the image's ENTRYPOINT, `$(VAR)` expanded from the
container env) with the ConfigMap's files in a local directory standing for /etc/vllm-kvcomp and a
local model directory standing for MODEL_PATH; as the pod's runAsUser when started as root; then
waits for the startup probe's path and runs deploy/tools/smoke.py. This is how the single-gpu
overlay was exercised on an H100 (docs/DEPLOY.md, "How this was checked").

    kubectl kustomize deploy/k8s/overlays/single-gpu > /tmp/single-gpu.yaml
    python3 deploy/tools/serve_rendered.py /tmp/single-gpu.yaml --model-dir /srv/models/Llama-3.1-8B-Instruct

`--tiny-model` writes a random-weight 4-layer Llama with a word-level tokenizer into --model-dir
first (needs torch, transformers, tokenizers; no hub): enough to check wiring, not quality.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CONFIG_MOUNT = "/etc/vllm-kvcomp"


def load_rendered(path: Path) -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "vllm-kvcomp")
    spec = deployment["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "vllm")
    volume = next(
        v
        for v in spec["volumes"]
        if "configMap" in v
        and any(m["name"] == v["name"] and m["mountPath"] == CONFIG_MOUNT for m in container["volumeMounts"])
    )
    configmap = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
    )
    return {"pod": spec, "container": container}, configmap.get("data", {})


def build_command(rendered: dict, model_dir: Path, config_dir: Path, home: Path) -> tuple[list[str], dict]:
    """`vllm serve` argv and environment of the container, with local paths substituted."""
    container = rendered["container"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env.update(MODEL_PATH=str(model_dir), HOME=str(home), HF_HOME=str(home / ".cache" / "huggingface"))

    def expand(arg: str) -> str:
        arg = re.sub(r"(?<!\$)\$\((\w+)\)", lambda m: env[m.group(1)], arg)
        return arg.replace(CONFIG_MOUNT, str(config_dir))

    return ["vllm", "serve"] + [expand(str(a)) for a in container.get("args", [])], env


def write_tiny_model(model_dir: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = (
        ["<unk>", "<s>", "</s>"]
        + [f"w{i}" for i in range(900)]
        + "Item the value of key is Question what Answer : ? . , Say hello user assistant system".split()
    )
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant :"
    fast.save_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(3)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendered", type=Path, help="output of `kubectl kustomize deploy/k8s/overlays/X`")
    parser.add_argument("--model-dir", type=Path, required=True, help="local directory standing for MODEL_PATH")
    parser.add_argument("--tiny-model", action="store_true", help="write a random-weight tiny Llama there first")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vllm-kvcomp-serve"))
    parser.add_argument("--python", default=sys.executable, help="interpreter that has vLLM and the plugin")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the startup probe")
    parser.add_argument("--log", type=Path, default=None, help="vllm serve output (default: WORKDIR/serve.log)")
    parser.add_argument("--smoke-args", default="", help="extra arguments for smoke.py, e.g. '--no-chat'")
    args = parser.parse_args()

    rendered, config_files = load_rendered(args.rendered)
    workdir = args.workdir
    config_dir, home, tmp = workdir / "etc-vllm-kvcomp", workdir / "home", workdir / "tmp"
    for d in (config_dir, home / ".cache" / "huggingface", tmp):
        d.mkdir(parents=True, exist_ok=True)
    for name, text in config_files.items():
        (config_dir / name).write_text(text)
    if args.tiny_model and not (args.model_dir / "config.json").exists():
        write_tiny_model(args.model_dir)

    argv, container_env = build_command(rendered, args.model_dir, config_dir, home)
    env = dict(os.environ, **container_env, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    command = [args.python, "-m", "vllm.entrypoints.cli.main"] + argv[1:]

    prefix: list[str] = []
    uid = rendered["pod"].get("securityContext", {}).get("runAsUser")
    gid = rendered["pod"].get("securityContext", {}).get("runAsGroup", uid)
    if os.getuid() == 0 and uid:
        try:
            pwd.getpwuid(uid)
        except KeyError:  # as docker/Dockerfile does
            subprocess.run(["groupadd", "--gid", str(gid), "vllm"], check=False)
            subprocess.run(
                [
                    "useradd",
                    "--no-log-init",
                    "--no-user-group",
                    "--uid",
                    str(uid),
                    "--gid",
                    str(gid),
                    "--home-dir",
                    str(home),
                    "--shell",
                    "/bin/bash",
                    "vllm",
                ],
                check=True,
            )
        subprocess.run(["chown", "-R", f"{uid}:{gid}", str(home), str(tmp)], check=True)
        subprocess.run(["chmod", "-R", "a+rX", str(config_dir), str(args.model_dir)], check=True)
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]

    container = rendered["container"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    metrics_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "kvcomp-metrics")
    health = f"http://127.0.0.1:{port}{container['startupProbe']['httpGet']['path']}"
    log_path = args.log or workdir / "serve.log"
    print("command:", " ".join(prefix + command), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(prefix + command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        started = time.time()
        try:
            if not wait_healthy(health, proc, args.timeout):
                print(
                    f"FAIL {health} not healthy after {time.time() - started:.0f} s "
                    f"(exit code {proc.poll()}); see {log_path}",
                    flush=True,
                )
                return 1
            print(f"healthy after {time.time() - started:.0f} s", flush=True)
            smoke = subprocess.run(
                [
                    sys.executable,
                    str(HERE / "smoke.py"),
                    "--api",
                    f"http://127.0.0.1:{port}",
                    "--metrics",
                    f"http://127.0.0.1:{metrics_port}",
                    *args.smoke_args.split(),
                ],
                timeout=600,
                check=False,
            )
            return smoke.returncode
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end smoke of the plugin on a GPU: tiny random model, self-check on.

One engine (zigzag, budget 0.25), three workloads on it:
  * server budget: every request compressed, the first two self-checked
    (pages read back bit-exact, attention vs dense within tolerance);
  * per-request override kv_compression=uniform, kv_budget=0.5;
  * per-request kv_compression=none: nothing compressed.
Prints SMOKE OK or SMOKE FAIL with the reasons; exit code 1 on failure.
"""

import os
import sys

os.environ.setdefault("VLLM_KVCOMP_VERIFY", "2")

from bench.offline import run  # bench/ and evaluation/ on PYTHONPATH (session.sh)
from evaluation.random_model import make_random_model

if __name__ == "__main__":
    model = str(make_random_model("/tmp/kvcomp-work/llama-tiny", "llama-tiny"))
    base = {"num_prompts": 12, "prompt_len": [1500, 3000], "output_len": 16, "seed": 0}
    result = run(
        {
            "name": "smoke",
            "model": model,
            "compression": {"method": "zigzag", "budget": 0.25},
            "kv_cache_memory_bytes": 1 << 30,
            "max_model_len": 4096,
            "workloads": [
                {**base, "label": "server"},
                {**base, "label": "uniform@0.5", "extra_args": {"kv_compression": "uniform", "kv_budget": 0.5}},
                {**base, "label": "none", "extra_args": {"kv_compression": "none"}},
            ],
        }
    )
    failures = []
    kept_share = {}
    for w in result["workloads"]:
        metrics = w.get("plugin_metrics", {})
        name = w["workload"]["label"]
        compressed = metrics.get("vllm_kvcomp_requests_compressed_total", -1)
        prompt = metrics.get("vllm_kvcomp_prompt_tokens_total", 0.0)
        kept = sum(v for k, v in metrics.items() if k.startswith("vllm_kvcomp_tokens_kept_total"))
        kept_share[name] = kept / prompt / 16 if prompt else 0.0  # 16 layers
        print("SMOKE", name, {k: v for k, v in w.items() if k not in ("plugin_metrics", "tokens", "workload")})
        print("SMOKE", name, "metrics", {k: v for k, v in metrics.items() if "layer=" not in k and "_bucket" not in k})
        expected = 0 if name == "none" else 12
        if compressed != expected:
            failures.append(f"{name}: {compressed} requests compressed, expected {expected}")
        if w["output_tokens"] != 12 * 16:
            failures.append(f"{name}: {w['output_tokens']} output tokens")
    checks = result["workloads"][0].get("plugin_metrics", {})
    if checks.get("vllm_kvcomp_verify_checks_total{result=exact}", 0) < 1:
        failures.append("no exact self-check")
    if checks.get("vllm_kvcomp_verify_checks_total{result=mismatch}", 0) > 0:
        failures.append("self-check found a mismatch")
    if checks.get("vllm_kvcomp_verify_attention_rel_err", 1.0) > 1e-2:
        failures.append(f"attention rel err {checks.get('vllm_kvcomp_verify_attention_rel_err')}")
    if not 0.2 <= kept_share.get("server", 0) <= 0.35:
        failures.append(f"server budget 0.25 kept {kept_share.get('server'):.3f} of the prompt")
    if not 0.45 <= kept_share.get("uniform@0.5", 0) <= 0.6:
        failures.append(f"uniform@0.5 kept {kept_share.get('uniform@0.5'):.3f} of the prompt")
    print("SMOKE kept share", kept_share)
    print("SMOKE", "OK" if not failures else f"FAIL {failures}")
    sys.exit(1 if failures else 0)

"""Quick end-to-end smoke of the plugin on a GPU: tiny random model, compression on, self-check on."""

import os

os.environ.setdefault("VLLM_KVCOMP_VERIFY", "2")

from vllm_kvcomp.bench.offline import run
from vllm_kvcomp.bench.random_model import make_random_model

if __name__ == "__main__":
    model = str(make_random_model("/tmp/kvcomp-work/llama-tiny", "llama-tiny"))
    result = run(
        {
            "name": "smoke",
            "model": model,
            "compression": {"method": "zigzag", "budget": 0.25},
            "kv_cache_memory_bytes": 1 << 30,
            "max_model_len": 4096,
            "workload": {"num_prompts": 12, "prompt_len": [1500, 3000], "output_len": 16, "seed": 0},
        }
    )
    metrics = result.get("plugin_metrics", {})
    print("SMOKE", {k: v for k, v in result.items() if k not in ("plugin_metrics", "tokens")})
    print("SMOKE metrics", {k: v for k, v in metrics.items() if "layer=" not in k})

"""A 128k-token prompt at the 8B layer shape on the GPU, at several budgets (hardening issue, item 2).

One engine (8 layers of Llama-3.1-8B's shape, random weights), the plugin's default
256 MiB eviction workspace: each request's eviction needs ~42 MB per layer, so it is
scored in groups of layers. Every budget compresses its request, keeps about its
budget, and generates its tokens; nothing runs out of memory.
Set KVCOMP_RESULTS_DIR to keep long_prompt.json.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

PROMPT_LEN = 131072
BUDGETS = (0.05, 0.2, 0.5)
LAYERS = 8


def test_128k_prompt_at_8b_shape_compresses_within_the_workspace(tmp_path):
    from bench.offline import run_in_subprocess
    from evaluation.random_model import make_random_model

    work = Path(os.environ.get("KVCOMP_WORK_DIR", tmp_path))
    model = str(make_random_model(work / "llama-8b-8l", "llama-8b-8l", max_position=PROMPT_LEN + 1024))
    spec = {
        "name": "long_prompt",
        "model": model,
        "kv_cache_memory_bytes": 24 << 30,
        "max_model_len": PROMPT_LEN + 256,
        "max_num_seqs": 4,
        "compression": {"method": "uniform", "budget": 0.2},
        "workloads": [
            {"num_prompts": 1, "prompt_len": PROMPT_LEN, "output_len": 32, "seed": i, "extra_args": {"kv_budget": b}}
            for i, b in enumerate(BUDGETS)
        ],  # fmt: skip
    }
    result = run_in_subprocess(spec, work, timeout=900)
    rows = []
    for budget, run in zip(BUDGETS, result["workloads"]):
        metrics = run["plugin_metrics"]
        assert run["output_tokens"] == 32
        assert metrics.get("vllm_kvcomp_requests_compressed_total") == 1, metrics
        kept = sum(v for k, v in metrics.items() if k.startswith("vllm_kvcomp_tokens_kept_total"))
        share = kept / (PROMPT_LEN * LAYERS)
        assert budget <= share <= budget + 0.01, (budget, share)
        rows.append({"budget": budget, "kept_share": share, "elapsed_s": run["elapsed_s"],
                     "blocks_freed": metrics.get("vllm_kvcomp_blocks_freed_total")})  # fmt: skip
    log = (work / "long_prompt.log").read_text()
    assert "scored in 2 groups of layers" in log  # 256 MiB holds 6 of the 8 layers of one 128k request
    assert "MiB reserved for page tables, capture buffers and eviction" in log
    out = os.environ.get("KVCOMP_RESULTS_DIR")
    if out:
        record = {
            "command": "pytest -m gpu tests/engine/test_long_prompt_gpu.py",
            "date": datetime.date.today().isoformat(),
            "device": result.get("device"),
            "vllm": result.get("vllm"),
            "torch": result.get("torch"),
            "model": f"random Llama, Llama-3.1-8B layer shape, {LAYERS} layers",
            "prompt_len": PROMPT_LEN,
            "eviction_workspace_mb": 256,
            "results": rows,
        }
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "long_prompt.json").write_text(json.dumps(record, indent=1))

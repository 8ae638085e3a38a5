"""Off means stock, provably (hardening issue, item 8). Not yet run on a GPU: see the issue notes.

Random-weight stock vLLM is not token-deterministic from run to run, so one
plugin-vs-stock comparison proves little. In vLLM's batch-invariant mode
(`VLLM_BATCH_INVARIANT=1`; the plugin's backend inherits FlashAttention's
support: one KV split per query) budget 1.0 and a per-request "none" must give
exactly stock's tokens, with mixed prompt lengths. In normal mode the
agreement is reported beside stock's agreement with itself on the same
workload. Set KVCOMP_RESULTS_DIR to write identity.json.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

WORKLOAD = {"num_prompts": 24, "prompt_len": [1000, 8000], "output_len": 64, "seed": 3}


def _share(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("mode", ["deterministic", "normal"])
def test_budget_one_and_none_match_stock(tmp_path, mode, tp):
    from bench.offline import run_in_subprocess
    from evaluation.random_model import make_random_model

    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs (kind nvidia-h200-x2 for TP=2)")
    work = Path(os.environ.get("KVCOMP_WORK_DIR", tmp_path))
    base = {
        "model": str(make_random_model(work / "llama-1b", "llama-1b")),
        "kv_cache_memory_bytes": 8 << 30,
        "max_model_len": 8192 + 128,
        "tensor_parallel_size": tp,
        "return_tokens": True,
        "env": {"VLLM_BATCH_INVARIANT": "1"} if mode == "deterministic" else {},
    }
    # stock twice on one engine (its own run-to-run agreement), then the plugin:
    # server budget 1.0, and a per-request "none" on a compressing server
    stock = run_in_subprocess({**base, "name": f"stock_{mode}_tp{tp}", "workloads": [WORKLOAD, WORKLOAD]}, work)
    plugin = run_in_subprocess(
        {
            **base,
            "name": f"plugin_{mode}_tp{tp}",
            "compression": {"method": "uniform", "budget": 1.0},
            "workloads": [WORKLOAD, {**WORKLOAD, "extra_args": {"kv_compression": "none"}}],
        },
        work,
    )
    stock_a, stock_b = (w["tokens"] for w in stock["workloads"])
    budget_one, none = (w["tokens"] for w in plugin["workloads"])
    record = {
        "mode": mode,
        "tp": tp,
        "prompt_lens": WORKLOAD["prompt_len"],
        "num_prompts": WORKLOAD["num_prompts"],
        "stock_vs_stock_share": _share(stock_a, stock_b),
        "identical_share_budget_1": _share(budget_one, stock_a),
        "identical_share_none": _share(none, stock_a),
        "command": f"pytest -m gpu tests/engine/test_identity_gpu.py -k '{mode} and {tp}'",
        "commit": os.environ.get("KVCOMP_COMMIT"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": stock.get("device"),
        "vllm": stock.get("vllm"),
        "torch": stock.get("torch"),
    }
    out = os.environ.get("KVCOMP_RESULTS_DIR")
    if out:
        path = Path(out) / "identity.json"
        cases = json.loads(path.read_text())["cases"] if path.exists() else []
        cases = [c for c in cases if (c["mode"], c["tp"]) != (mode, tp)] + [record]
        path.write_text(json.dumps({"cases": cases}, indent=1))
    if mode == "deterministic":
        assert record["stock_vs_stock_share"] == 1.0, "batch-invariant stock is not deterministic here"
        assert record["identical_share_budget_1"] == 1.0
        assert record["identical_share_none"] == 1.0

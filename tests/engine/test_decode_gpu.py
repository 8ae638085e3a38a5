"""Decode-time eviction (issue #12, steps 2, 4 and 5) in a real engine: the first GPU check.

Stock vLLM and the plugin (uniform, 512 tokens per layer, evict_every 128) run
the same 24 prompts of 1,024 tokens with 1,536 generated tokens each, in one
invocation on the same GPU and the same KV pool (64k tokens of a random 16-layer
Llama). Stock's footprint grows to prompt + output (2.5k tokens a request, the
whole pool); with budgets that hold while decoding each request stays near
512 + 128 tokens after its prefill. Checked: every request completes, decode
evictions happen and free blocks, none fails or is deferred, and the plugin's
largest KV usage stays under half of stock's. Set KVCOMP_RESULTS_DIR to write
decode_smoke.json.

The self-check case runs the plugin alone with VLLM_KVCOMP_VERIFY under both CUDA
graph modes: after decode evictions every layer reads back exactly and FlashAttention
matches dense attention, and the decode-query ring (filled inside the graphs) holds
queries whose LSE over the live keys equals the LSE FlashAttention recorded with them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

WORKLOAD = {"num_prompts": 24, "prompt_len": 1024, "output_len": 1536, "seed": 5}
KV_TOKENS = 65536


@pytest.mark.parametrize("tp", [1, 2])
def test_budgets_hold_while_decoding(tmp_path, tp):
    from bench.offline import provenance, run_in_subprocess
    from evaluation.random_model import kv_bytes_per_token, make_random_model

    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs (kind nvidia-h200-x2 for TP=2)")
    work = Path(os.environ.get("KVCOMP_WORK_DIR", tmp_path))
    base = {
        "model": str(make_random_model(work / "llama-tiny", "llama-tiny")),
        # per GPU: each rank holds 1/tp of the KV heads, so the pool holds the same tokens at any TP
        "kv_cache_memory_bytes": KV_TOKENS * kv_bytes_per_token("llama-tiny") // tp,
        "tensor_parallel_size": tp,
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.3,
        "workload": WORKLOAD,
    }
    torch.cuda.empty_cache()
    stock = run_in_subprocess({**base, "name": f"decode_stock_tp{tp}"}, work)
    compression = {"method": "uniform", "budget": 512, "evict_every": 128}
    plugin = run_in_subprocess({**base, "name": f"decode_plugin_tp{tp}", "compression": compression}, work)
    metrics = plugin["plugin_metrics"]
    record = {
        "tp": tp,
        "workload": WORKLOAD,
        "kv_pool_tokens": KV_TOKENS,
        "compression": compression,
        "stock": {k: stock[k] for k in ("output_tok_s", "max_running", "max_kv_cache_usage", "elapsed_s")},
        "plugin": {k: plugin[k] for k in ("output_tok_s", "max_running", "max_kv_cache_usage", "elapsed_s")},
        "ratio_output_tok_s": plugin["output_tok_s"] / stock["output_tok_s"],
        "plugin_metrics": {k: v for k, v in metrics.items() if "bucket" not in k},
        **provenance(f"pytest -m gpu tests/engine/test_decode_gpu.py -k {tp}", stock),
    }
    out = os.environ.get("KVCOMP_RESULTS_DIR")
    if out:
        (Path(out) / f"decode_smoke_tp{tp}.json").write_text(json.dumps(record, indent=1) + "\n")
    expected_tokens = WORKLOAD["num_prompts"] * WORKLOAD["output_len"]
    assert stock["output_tokens"] == plugin["output_tokens"] == expected_tokens
    assert metrics.get("vllm_kvcomp_decode_evictions_total", 0) > 0
    assert metrics.get("vllm_kvcomp_decode_blocks_freed_total", 0) > 0
    assert not any(k.startswith("vllm_kvcomp_requests_failed") and v for k, v in metrics.items())
    assert not any(k.startswith("vllm_kvcomp_decode_evictions_deferred") and v for k, v in metrics.items())
    assert plugin["max_kv_cache_usage"] < 0.5 * stock["max_kv_cache_usage"]


@pytest.mark.parametrize("cudagraph_mode", ["FULL_AND_PIECEWISE", "PIECEWISE"])
def test_decode_evictions_pass_the_self_check(tmp_path, cudagraph_mode):
    from bench.offline import provenance, run_in_subprocess
    from evaluation.random_model import kv_bytes_per_token, make_random_model

    work = Path(os.environ.get("KVCOMP_WORK_DIR", tmp_path))
    checks = 4  # per worker: up to 4 prefill batches and, separately, 4 decode-eviction batches
    spec = {
        "name": f"decode_verify_{cudagraph_mode.lower()}",
        "model": str(make_random_model(work / "llama-tiny", "llama-tiny")),
        "kv_cache_memory_bytes": KV_TOKENS * kv_bytes_per_token("llama-tiny"),
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.3,
        "cudagraph_mode": cudagraph_mode,
        "workload": {**WORKLOAD, "num_prompts": 8, "output_len": 512},
        "compression": {"method": "uniform", "budget": 512, "evict_every": 128},
        "env": {"VLLM_KVCOMP_VERIFY": str(checks)},
    }
    torch.cuda.empty_cache()
    run = run_in_subprocess(spec, work)
    metrics = run["plugin_metrics"]
    out = os.environ.get("KVCOMP_RESULTS_DIR")
    if out:
        record = {
            "spec": {k: v for k, v in spec.items() if k != "model"},
            **provenance(f"pytest -m gpu tests/engine/test_decode_gpu.py -k {cudagraph_mode}", run),
            "plugin_metrics": {k: v for k, v in metrics.items() if "bucket" not in k and "layer=" not in k},
        }
        (Path(out) / f"{spec['name']}.json").write_text(json.dumps(record, indent=1) + "\n")
    assert run["output_tokens"] == 8 * 512
    assert metrics.get("vllm_kvcomp_decode_evictions_total", 0) > 0
    # decode evictions were checked, each exact (counted apart from the prefill's checks, whose number
    # depends on how many prefill batches vLLM formed: 6 checks in all at 84d10a4, 4 at fa6ba15)
    assert metrics.get("vllm_kvcomp_verify_decode_checks_total{result=exact}", 0) >= 1
    assert metrics.get("vllm_kvcomp_verify_checks_total{result=mismatch}", 0) == 0
    assert metrics["vllm_kvcomp_verify_attention_rel_err"] < 2e-2
    # fed only by decode checks whose W ring rows all ran after the last eviction
    assert metrics["vllm_kvcomp_verify_ring_lse_abs_err"] < 2e-2

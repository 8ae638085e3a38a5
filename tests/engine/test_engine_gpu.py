"""Engine evidence on a GPU (marked `gpu`; run on the H100, results in bench/results/).

One random-weight Llama-shaped model (16 layers, 32 query / 8 KV heads), 16k
prompts, the same prompts and the same `--kv-cache-memory-bytes` for every run,
each configuration in its own process (bench/offline.py):

  stock         vLLM 0.25.1 with the plugin installed but off
  plugin_b1     uniform, budget 1.0: all the machinery on, nothing evicted
  plugin_b02    uniform, budget 0.2, with the in-engine self-check and an
                oracle-kept needle (tests/engine/needle_oracle.py)
  zigzag_b02    zigzag, budget 0.2

Set KVCOMP_RESULTS_DIR to write engine.json and engine.md there.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

PROMPT_LEN = 16384
OUTPUT_LEN = 256
NUM_PROMPTS = 48
KV_BYTES = 4 << 30
BLOCK = 16
NEEDLE = (5000, 5016)
ORACLE = Path(__file__).with_name("needle_oracle.py")  # test-only observer, loaded by the engine


def _specs(model: str) -> list[dict]:
    workload = {"num_prompts": NUM_PROMPTS, "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN, "seed": 1}
    base = {
        "model": model,
        "kv_cache_memory_bytes": KV_BYTES,
        "max_model_len": PROMPT_LEN + OUTPUT_LEN + 64,
        "max_num_seqs": 256,
        "workload": workload,
        "return_tokens": True,
    }
    return [
        {**base, "name": "stock", "compression": None},
        {**base, "name": "plugin_b1", "compression": {"method": "uniform", "budget": 1.0}},
        {
            **base,
            "name": "plugin_b02",
            "compression": {"method": "uniform", "budget": 0.2},
            "env": {
                "VLLM_KVCOMP_VERIFY": "8",
                "VLLM_KVCOMP_OBSERVER": f"{ORACLE}:NeedleOracle",
                "VLLM_KVCOMP_FORCE_KEEP": f"{NEEDLE[0]}:{NEEDLE[1]}",
            },
        },
        {**base, "name": "zigzag_b02", "compression": {"method": "zigzag", "budget": 0.2}},
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    from bench.offline import run_in_subprocess
    from evaluation.random_model import make_random_model

    work = Path(os.environ.get("KVCOMP_WORK_DIR", tmp_path_factory.mktemp("engine")))
    model = str(make_random_model(work / "llama-1b", "llama-1b"))
    torch.cuda.empty_cache()
    results = {}
    for spec in _specs(model):
        results[spec["name"]] = run_in_subprocess(spec, work / "logs", timeout=600)
    yield results
    out = os.environ.get("KVCOMP_RESULTS_DIR")
    if out:
        _write_results(Path(out), results)


def _plugin(result: dict, name: str) -> float:
    return sum(v for k, v in result["plugin_metrics"].items() if k == name or k.startswith(name + "{"))


def _per_layer(result: dict) -> list[dict]:
    metrics, n = result["plugin_metrics"], _plugin(result, "vllm_kvcomp_requests_compressed_total")
    budget = math.ceil(0.2 * PROMPT_LEN)
    rows = []
    for layer in range(16):
        kept = metrics.get(f"vllm_kvcomp_tokens_kept_total{{layer={layer}}}", 0.0) / max(n, 1)
        rows.append(
            {
                "layer": layer,
                "budget_tokens": budget,
                "blocks_expected": math.ceil(budget / BLOCK),
                "blocks_measured": kept / BLOCK,
            }
        )
    return rows


def test_budget_one_is_token_identical_to_stock(runs):
    assert runs["plugin_b1"]["tokens"] == runs["stock"]["tokens"]
    assert "vllm_kvcomp_requests_compressed_total" in runs["plugin_b1"]["plugin_metrics"]
    assert _plugin(runs["plugin_b1"], "vllm_kvcomp_requests_compressed_total") == 0


def test_compressed_layers_hold_their_budget(runs):
    result = runs["plugin_b02"]
    assert _plugin(result, "vllm_kvcomp_requests_compressed_total") == NUM_PROMPTS
    assert _plugin(result, "vllm_kvcomp_requests_skipped_total") == 0
    for row in _per_layer(result):
        assert row["blocks_measured"] == row["blocks_expected"], row
    # each request keeps ceil(sum of pages / L) of its 1024 prompt blocks
    freed = _plugin(result, "vllm_kvcomp_blocks_freed_total") / NUM_PROMPTS
    assert freed == PROMPT_LEN // BLOCK - math.ceil(0.2 * PROMPT_LEN / BLOCK)


def test_attention_reads_the_right_tokens_after_eviction(runs):
    metrics = runs["plugin_b02"]["plugin_metrics"]
    assert metrics.get("vllm_kvcomp_verify_checks_total{result=exact}", 0) >= 1
    assert metrics.get("vllm_kvcomp_verify_checks_total{result=mismatch}", 0) == 0
    assert metrics.get("vllm_kvcomp_verify_needle_total{result=kept}", 0) >= 1
    assert metrics.get("vllm_kvcomp_verify_needle_total{result=lost}", 0) == 0
    assert metrics["vllm_kvcomp_verify_attention_rel_err"] < 2e-2


def test_more_requests_fit_at_the_same_kv_memory(runs):
    stock, compressed = runs["stock"]["max_running"], runs["plugin_b02"]["max_running"]
    assert stock > 0 and compressed / stock > 2.0, (stock, compressed)
    assert runs["zigzag_b02"]["max_running"] / stock > 2.0


def _write_results(out: Path, runs: dict) -> None:
    import torch
    import vllm

    out.mkdir(parents=True, exist_ok=True)
    stock = runs["stock"]
    summary = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "vllm": vllm.__version__,
        "model": "random-weight Llama (16 layers, hidden 2048, 32 q / 8 kv heads, head_dim 64), bf16",
        "workload": {
            "num_prompts": NUM_PROMPTS,
            "prompt_len": PROMPT_LEN,
            "output_len": OUTPUT_LEN,
            "kv_cache_memory_bytes": KV_BYTES,
        },
        "greedy_identical_at_budget_1": runs["plugin_b1"]["tokens"] == stock["tokens"],
        "concurrency_ratio_at_budget_0.2": runs["plugin_b02"]["max_running"] / stock["max_running"],
        "throughput_ratio_at_budget_1": runs["plugin_b1"]["output_tok_s"] / stock["output_tok_s"],
        "throughput_ratio_at_budget_0.2": runs["plugin_b02"]["output_tok_s"] / stock["output_tok_s"],
        "zigzag_concurrency_ratio_at_budget_0.2": runs["zigzag_b02"]["max_running"] / stock["max_running"],
        "per_layer": _per_layer(runs["plugin_b02"]),
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in runs.items()},
    }
    (out / "engine.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Engine evidence (GPU)",
        "",
        f"Command: `KVCOMP_RESULTS_DIR=bench/results pytest -m gpu tests/engine/test_engine_gpu.py`; "
        f"{summary['date']}, {summary['device']}, vLLM {summary['vllm']}, torch {torch.__version__}.",
        f"Model: {summary['model']}. {NUM_PROMPTS} prompts x {PROMPT_LEN} tokens, {OUTPUT_LEN} output tokens, "
        f"greedy, KV cache memory {KV_BYTES >> 30} GiB for every run.",
        "",
        "| run | out tok/s | req/s | max running | elapsed s | blocks freed / req |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        freed = ""
        compressed = _plugin(r, "vllm_kvcomp_requests_compressed_total") if r.get("plugin_metrics") else 0
        if compressed:
            freed = f"{_plugin(r, 'vllm_kvcomp_blocks_freed_total') / compressed:.0f}"
        row = (name, f"{r['output_tok_s']:.0f}", f"{r['req_s']:.2f}")
        row += (f"{r['max_running']:.0f}", f"{r['elapsed_s']:.1f}")
        lines.append("| " + " | ".join([*row, freed]) + " |")
    lines += [
        "",
        f"- greedy outputs identical at budget 1.0: {summary['greedy_identical_at_budget_1']}",
        f"- concurrency ratio at budget 0.2: {summary['concurrency_ratio_at_budget_0.2']:.2f}",
        f"- throughput ratio at budget 1.0 (overhead): {summary['throughput_ratio_at_budget_1']:.3f}",
    ]
    (out / "engine.md").write_text("\n".join(lines) + "\n")

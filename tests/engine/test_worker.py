"""engine/worker.py on CPU: which layers can be compressed, and per-request configs that were never validated."""

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm.v1.worker.gpu_worker import Worker

from vllm_kvcomp.config import CompressionConfigError, build_config
from vllm_kvcomp.engine.kv_cache import CompressedAttentionSpec
from vllm_kvcomp.engine.worker import CompressionModelRunner, CompressionWorker


def spec(**kw):
    return FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize(
    "layer_spec, needle",
    [
        (spec(non_causal=True), "non-causal attention"),
        (
            SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16, sliding_window=128),
            "only full attention",
        ),
    ],
)
def test_layers_the_attention_backend_cannot_serve_are_refused(monkeypatch, layer_spec, needle):
    monkeypatch.setattr(Worker, "get_kv_cache_spec", lambda self: {"layers.0.attn": layer_spec})
    with pytest.raises(CompressionConfigError, match=needle):
        CompressionWorker.get_kv_cache_spec(object.__new__(CompressionWorker))


def test_full_causal_layers_become_compressed_specs(monkeypatch):
    monkeypatch.setattr(Worker, "get_kv_cache_spec", lambda self: {"layers.0.attn": spec()})
    (converted,) = CompressionWorker.get_kv_cache_spec(object.__new__(CompressionWorker)).values()
    assert isinstance(converted, CompressedAttentionSpec) and converted.page_size_bytes == spec().page_size_bytes


def test_an_unvalidated_request_config_falls_back_to_the_servers(caplog):
    runner = object.__new__(CompressionModelRunner)
    runner.kvcomp = SimpleNamespace(config=build_config(method="zigzag"))
    new = SimpleNamespace(req_id="r", sampling_params=SimpleNamespace(extra_args={"kv_budget": "lots"}))
    with caplog.at_level("WARNING", logger="vllm.kvcomp"):
        assert runner._request_config(new) is None  # None: the server's config
    assert "using the server's settings" in caplog.text


@pytest.mark.parametrize("evict_every", [None, 128])
def test_profile_run_reserves_the_plugins_memory(monkeypatch, evict_every):
    """vLLM sizes the KV cache from the profiled peak: the plugin's buffers and workspace are in it,
    and the decode-query ring only when decode-time eviction is on."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_kvcomp.engine import worker

    monkeypatch.setattr(GPUModelRunner, "profile_run", lambda self: None)
    allocated = []
    monkeypatch.setattr(worker.torch, "empty", lambda n, **kw: allocated.append(n))
    runner = object.__new__(CompressionModelRunner)
    runner.device = torch.device("cpu")
    overrides = {"eviction_workspace_mb": 64, "evict_every": evict_every, "decode_window": 16}
    runner.kvcomp = SimpleNamespace(config=build_config(method="zigzag", overrides=overrides))
    model = SimpleNamespace(
        get_num_layers=lambda p: 32, get_num_attention_heads=lambda p: 32, get_head_size=lambda: 128,
        dtype=torch.bfloat16, max_model_len=131072,
    )  # fmt: skip
    runner.vllm_config = SimpleNamespace(
        model_config=model, parallel_config=None, cache_config=SimpleNamespace(block_size=16),
        scheduler_config=SimpleNamespace(max_num_seqs=256, max_num_batched_tokens=8192),
    )  # fmt: skip
    runner.profile_run()
    tables = 32 * 256 * (8192 + 1) * 4
    capture = 32 * 16 * 32 * 32 * (128 * 2 + 4)
    # 257 ring slots (one per running request + scratch) x 16 decode queries, and the token index.
    ring = 0 if evict_every is None else 32 * 257 * 16 * 32 * (128 * 2 + 4) + 8192 * 8
    assert allocated == [tables + 3 * 257 * 32 * 4 + capture + ring + (64 << 20)]

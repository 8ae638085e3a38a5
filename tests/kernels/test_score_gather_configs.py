"""kernels/score_gather_configs.py: candidates, autotune keys and pruning of the score-gather kernels.

The GPU branch of the pruning is checked here too (by pretending not to
interpret): it must reproduce the launches picked by hand before autotune.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from kvtest_utils import score_inputs
from vllm_kvcomp.kernels import common, score_gather
from vllm_kvcomp.kernels import score_gather_configs as cfgs
from vllm_kvcomp.kernels import score_gather_kernels as sgk

KERNELS = {
    "window_sum": (sgk.window_sum_kernel, cfgs.WINDOW_SUM_CONFIGS, cfgs.WINDOW_SUM_KEY),
    "lse_partial": (sgk.lse_partial_kernel, cfgs.LSE_CONFIGS, cfgs.LSE_KEY),
    "pool": (sgk.pool_gqa_kernel, cfgs.POOL_CONFIGS, cfgs.POOL_KEY),
}


def _launch(c):
    return (c.kwargs, c.num_warps, c.num_stages)


def test_defaults_are_the_measured_configs():
    """The first candidate is what serving launches: window_sum's is the H200's fastest at both shapes
    measured (the H100's default second); the others are what score_gather launched before autotune."""
    assert _launch(cfgs.WINDOW_SUM_CONFIGS[0]) == ({"BT": 64, "TPP": 16}, 4, 3)
    assert _launch(cfgs.WINDOW_SUM_CONFIGS[1]) == ({"BT": 64, "TPP": 16}, 8, 4)
    assert _launch(cfgs.LSE_CONFIGS[0]) == ({"BT": 64, "TPS": 16}, 8, 3)
    assert _launch(cfgs.POOL_CONFIGS[0]) == ({"BT": 256}, 4, 3)


def test_lse_candidates_cover_one_split():
    for c in [*cfgs.LSE_CONFIGS, cfgs._INTERPRETER_LSE]:
        assert c.kwargs["BT"] * c.kwargs["TPS"] == cfgs.LSE_SPLIT


@pytest.mark.parametrize("name", KERNELS)
def test_keys_hold_only_per_model_constexprs(name):
    kernel, configs, key = KERNELS[name]
    assert kernel.keys == key and len(configs) > 1
    params = inspect.signature(kernel.base_fn).parameters
    for k in key:  # compile-time constants of the kernel, never a length, count or stride
        assert "constexpr" in str(params[k].annotation), k
    assert not {"S", "NS", "R", "L"} & set(key)


@pytest.mark.parametrize("name", KERNELS)
def test_interpreter_pruning_leaves_one_config(name, monkeypatch):
    kernel, configs, _ = KERNELS[name]
    monkeypatch.setenv(common.AUTOTUNE_ENV, "1")  # ignored under the interpreter
    monkeypatch.setattr(common, "interpreting", lambda: True)
    pruned = kernel.early_config_prune(configs, {"kv_ptr": torch.empty(0, dtype=torch.bfloat16)}, BM=16, BD=16)
    assert len(pruned) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's single config")
def test_interpreter_autotune_times_nothing(device):
    """End to end: each kernel's autotune saw one config, and a new batch / length reuses its choice."""
    for kernel, _, _ in KERNELS.values():
        kernel.cache.clear()
    shapes = dict(Hkv=1, G=2, D=16, block_size=16, dtype=torch.float16, device=device)
    q, wl, kv, pt, sl = score_inputs([9, 20], [3, 4], **shapes, seed=1)
    kw = dict(scale=0.25, pool_kernel=3, pool_type="max", square=False)
    score_gather(q, wl, kv, pt, sl, window_lse=None, **kw)
    for kernel, _, _ in KERNELS.values():
        assert len(kernel.configs_timings) == 1 and len(kernel.cache) == 1
    # other batch size and lengths, same model shapes: no new autotune entry
    q, wl, kv, pt, sl = score_inputs([40, 5, 33], [4, 4, 1], **shapes, seed=2)
    score_gather(q, wl, kv, pt, sl, window_lse=None, **kw)
    assert all(len(kernel.cache) == 1 for kernel, _, _ in KERNELS.values())


def test_fit_dot_launch():
    # the benchmark shape (BM = 4 * 32, D 128, bf16): the tuned config fits as it is
    assert cfgs.fit_dot_launch(8, 4, 128, 64, 128, 2) == (8, 4)
    assert cfgs.fit_dot_launch(4, 3, 128, 128, 128, 2) == (4, 3)  # 16K logits: warps kept
    assert cfgs.fit_dot_launch(4, 3, 256, 128, 128, 2) == (8, 3)  # 32K logits: 8 warps
    # G*W = 512 with D = 256: (512 + ns * 64) * 256 * 2 B > 200 KB down to one stage
    assert cfgs.fit_dot_launch(8, 4, 512, 64, 256, 2) == (8, 1)
    assert cfgs.fit_dot_launch(8, 4, 256, 64, 256, 2) == (8, 2)  # (256 + 2 * 64) * 512 = 192 KB


def test_gpu_pruning(monkeypatch):
    """Not interpreting: the fitted default only; with tuning on, every fitted candidate once."""
    monkeypatch.setattr(common, "interpreting", lambda: False)
    monkeypatch.delenv(common.AUTOTUNE_ENV, raising=False)
    args = {"kv_ptr": torch.empty(0, dtype=torch.bfloat16)}
    ws = sgk.window_sum_kernel
    default = ws.early_config_prune(ws.configs, args, BM=128, BD=128)
    assert [_launch(c) for c in default] == [({"BT": 64, "TPP": 16}, 4, 3)]
    big = ws.early_config_prune(ws.configs, args, BM=512, BD=256)
    assert [_launch(c) for c in big] == [({"BT": 64, "TPP": 16}, 8, 1)]
    lse = sgk.lse_partial_kernel.early_config_prune(cfgs.LSE_CONFIGS, args, BM=128, BD=128)
    assert [_launch(c) for c in lse] == [({"BT": 64, "TPS": 16}, 8, 3)]
    assert [_launch(c) for c in sgk.pool_gqa_kernel.early_config_prune(cfgs.POOL_CONFIGS, {})] == [({"BT": 256}, 4, 3)]
    monkeypatch.setenv(common.AUTOTUNE_ENV, "1")
    every = ws.early_config_prune(ws.configs, args, BM=128, BD=128)
    assert len(every) == len(cfgs.WINDOW_SUM_CONFIGS) and _launch(every[0]) == ({"BT": 64, "TPP": 16}, 4, 3)
    # configs that fit the same way are timed once
    assert len(ws.early_config_prune(ws.configs, args, BM=512, BD=256)) < len(cfgs.WINDOW_SUM_CONFIGS)

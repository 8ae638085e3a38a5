"""kernels/common.py: the forced-token mask, the interpreter check, the autotune policy."""

from __future__ import annotations

import pytest
import torch
import triton
from vllm_kvcomp.kernels import common, forced_keep_mask, select_keep_indices_reference


def _forced_loops(seq_lens, length, num_sinks, num_recent):
    """The definition, one position at a time."""
    return torch.tensor(
        [[t < L and (t < num_sinks or t >= L - num_recent) for t in range(length)] for L in seq_lens],
        dtype=torch.bool,
    )


@pytest.mark.parametrize("sinks,recent", [(0, 0), (4, 8), (2, 1), (0, 5), (3, 0), (50, 50)])
def test_forced_keep_mask_matches_definition(device, sinks, recent):
    seq_lens = [0, 1, 3, 12, 40, 45]  # empty row, rows shorter than sinks + recent, length == S
    length = 45
    expect = _forced_loops(seq_lens, length, sinks, recent)
    got = forced_keep_mask(torch.tensor(seq_lens, dtype=torch.int32, device=device), length, sinks, recent)
    assert got.dtype == torch.bool and got.shape == (len(seq_lens), length) and got.device.type == device
    assert torch.equal(got.cpu(), expect)
    # a sequence of ints works too; nothing at or beyond a row's length is forced
    assert torch.equal(forced_keep_mask(seq_lens, length, sinks, recent), expect)
    assert not got[0].any()


def test_forced_keep_mask_is_the_one_used_everywhere(device):
    """vllm_kvcomp.scoring and the selection reference use this helper."""
    from vllm_kvcomp import scoring

    lens = torch.tensor([30, 7, 16], device=device)
    assert torch.equal(scoring.forced_keep_mask(lens, 32, 4, 6), forced_keep_mask(lens, 32, 4, 6))
    scores = torch.arange(20, dtype=torch.float32).flip(0)[None]  # best scores first: forced ones are the last
    idx = select_keep_indices_reference(scores, 9, num_sinks=2, num_recent=3)
    assert idx.tolist() == [[0, 1, 2, 3, 4, 5, 17, 18, 19]]


def test_interpreting_follows_conftest():
    assert common.interpreting() == (not torch.cuda.is_available())  # tests/conftest.py sets TRITON_INTERPRET


CONFIGS = [triton.Config({"BT": 64}, num_warps=8, num_stages=4), triton.Config({"BT": 32}, num_warps=4)]
SMALL = triton.Config({"BT": 16})


def test_prune_policy(monkeypatch):
    """Interpreter: only the small config, whatever the env; GPU: the default unless tuning is on."""
    halve = lambda c, named_args, meta: triton.Config(c.kwargs, num_warps=c.num_warps // 2, num_stages=1)  # noqa: E731
    prune = common.prune_for(SMALL, halve)
    monkeypatch.setenv(common.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(common, "interpreting", lambda: True)
    assert prune(CONFIGS, {}) == [SMALL]
    assert not common.autotune_enabled()
    monkeypatch.setattr(common, "interpreting", lambda: False)
    assert common.autotune_enabled()
    got = prune(CONFIGS + CONFIGS, {}, BM=16)  # duplicates after fitting are kept once
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in got] == [({"BT": 64}, 4, 1), ({"BT": 32}, 2, 1)]
    monkeypatch.setenv(common.AUTOTUNE_ENV, "0")
    assert [str(c) for c in prune(CONFIGS, {})] == [str(halve(CONFIGS[0], {}, {}))]
    assert common.prune_for(SMALL)(CONFIGS, {}) == [CONFIGS[0]]


def test_bench_when_tuning_runs_nothing_unless_tuning(monkeypatch):
    calls = []
    monkeypatch.delenv(common.AUTOTUNE_ENV, raising=False)
    assert common.bench_when_tuning(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert calls == []

"""score_gather (Triton; interpreter on CPU) against the float64 torch reference.

Runs on the `device` fixture: CPU + TRITON_INTERPRET here, CUDA on the H100.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kvtest_utils import TOL, assert_close_scores, score_inputs, window_lse_batch
from vllm_kvcomp.kernels import score_gather, score_gather_reference

POOLS = [(7, "max", False), (5, "avg", True), (1, "max", False), (3, "avg", False), (3, "max", True)]


def _poisoned(R, Hkv, S, device):
    return (
        torch.full((R, Hkv, S), float("nan"), device=device),
        torch.full((R, Hkv, S), float("nan"), device=device),
    )


def _check(out, expect, dtype, what):
    assert_close_scores(out.scores, expect.scores, TOL[dtype], what + " scores")
    assert_close_scores(out.mass, expect.mass, TOL[dtype], what + " mass")


CASES = list(itertools.product([torch.bfloat16, torch.float16], [16, 32], [1, 4, 7], ["lse", "two_pass"]))


@pytest.mark.parametrize("dtype,block_size,ratio,lse_mode", CASES)
def test_score_gather_matches_reference(device, dtype, block_size, ratio, lse_mode):
    # one-token sequence (window 1), W == seq_len, length not a multiple of the block size,
    # a window of 1 on a long sequence, a length spanning several key tiles
    seq_lens = [1, 9, 45, 70]
    win = [1, 9, 9, 1]
    idx = CASES.index((dtype, block_size, ratio, lse_mode))
    pool_kernel, pool_type, square = POOLS[idx % len(POOLS)]
    Hkv, D = 2, 32
    q, wl, kv, pt, sl = score_inputs(
        seq_lens, win, Hkv=Hkv, G=ratio, D=D, block_size=block_size, dtype=dtype, device=device, seed=idx
    )
    scale = D**-0.5
    lse = window_lse_batch(q, wl, kv, pt, sl, scale) if lse_mode == "lse" else None
    S = max(seq_lens) + 5  # outputs longer than every sequence
    out = score_gather(
        q,
        wl,
        kv,
        pt,
        sl,
        scale=scale,
        window_lse=lse,
        pool_kernel=pool_kernel,
        pool_type=pool_type,
        square=square,
        max_seq_len=S,
        block_t=16,
        tiles_per_program=2,
        out=_poisoned(len(seq_lens), Hkv, S, device),
    )
    expect = score_gather_reference(
        q, wl, kv, pt, sl, scale=scale, pool_kernel=pool_kernel, pool_type=pool_type, square=square, max_seq_len=S
    )
    _check(out, expect, dtype, f"case {idx}")
    for r, L in enumerate(seq_lens):
        assert torch.all(out.scores[r, :, L:] == float("-inf"))
        assert torch.all(out.mass[r, :, L:] == 0)
        assert torch.all(torch.isfinite(out.scores[r, :, :L]))


@pytest.mark.parametrize("lse_mode", ["lse", "two_pass"])
def test_autotuned_tiling_matches_reference(device, lse_mode):
    """No block_t / tiles_per_program: the autotuned configs (one small config under the interpreter)."""
    seq_lens = [1, 37, 130, 69]  # one token, lengths off the block size and off the key tiles
    win = [1, 5, 7, 7]
    Hkv, G, D = 2, 3, 24  # padded group and head dim
    q, wl, kv, pt, sl = score_inputs(
        seq_lens, win, Hkv=Hkv, G=G, D=D, block_size=16, dtype=torch.bfloat16, device=device, seed=21, W=8
    )
    lse = window_lse_batch(q, wl, kv, pt, sl, 0.2) if lse_mode == "lse" else None
    S = max(seq_lens) + 3
    kw = dict(scale=0.2, pool_kernel=5, pool_type="avg", square=True, max_seq_len=S)
    out = score_gather(q, wl, kv, pt, sl, window_lse=lse, out=_poisoned(len(seq_lens), Hkv, S, device), **kw)
    _check(out, score_gather_reference(q, wl, kv, pt, sl, **kw), torch.bfloat16, f"autotuned {lse_mode}")
    for r, L in enumerate(seq_lens):
        assert torch.all(out.scores[r, :, L:] == float("-inf")) and torch.all(out.mass[r, :, L:] == 0)


@pytest.mark.parametrize("block_t,tiles_per_program", [(16, 1), (16, 3), (32, 2), (64, 4)])
@pytest.mark.parametrize("pool", POOLS[:2])
def test_tiling_knobs_agree(device, block_t, tiles_per_program, pool):
    seq_lens = [100, 33, 64]
    win = [8, 5, 8]
    q, wl, kv, pt, sl = score_inputs(
        seq_lens,
        win,
        Hkv=2,
        G=2,
        D=16,
        block_size=16,
        dtype=torch.bfloat16,
        device=device,
        seed=block_t + tiles_per_program,
    )
    kw = dict(scale=0.25, pool_kernel=pool[0], pool_type=pool[1], square=pool[2])
    out = score_gather(q, wl, kv, pt, sl, window_lse=None, block_t=block_t, tiles_per_program=tiles_per_program, **kw)
    expect = score_gather_reference(q, wl, kv, pt, sl, **kw)
    _check(out, expect, torch.bfloat16, f"block_t={block_t} tpp={tiles_per_program}")


@pytest.mark.parametrize("pool", [(21, "max", False), (15, "avg", True), (3, "max", False)])
def test_pooling_windows_wider_than_a_program(device, pool):
    """Pooling windows wider than a window-sum program's keys (16), lengths at, one past and one short of
    a program's end, a one-token sequence, and outputs longer than every sequence."""
    seq_lens = [16, 17, 47, 100, 1]
    win = [5, 5, 8, 8, 1]
    q, wl, kv, pt, sl = score_inputs(
        seq_lens, win, Hkv=2, G=3, D=16, block_size=16, dtype=torch.bfloat16, device=device, seed=pool[0]
    )
    S = max(seq_lens) + 20
    kw = dict(scale=0.3, pool_kernel=pool[0], pool_type=pool[1], square=pool[2], max_seq_len=S)
    poisoned = _poisoned(len(seq_lens), 2, S, device)
    out = score_gather(q, wl, kv, pt, sl, block_t=16, tiles_per_program=1, window_lse=None, out=poisoned, **kw)
    _check(out, score_gather_reference(q, wl, kv, pt, sl, **kw), torch.bfloat16, f"pool {pool}")
    for r, L in enumerate(seq_lens):
        assert torch.all(out.scores[r, :, L:] == float("-inf")) and torch.all(torch.isfinite(out.scores[r, :, :L]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_pass_agrees_with_given_lse(device, dtype):
    seq_lens = [57, 130, 17]
    win = [16, 16, 17]
    q, wl, kv, pt, sl = score_inputs(seq_lens, win, Hkv=2, G=4, D=32, block_size=16, dtype=dtype, device=device, seed=7)
    scale = 0.2
    lse = window_lse_batch(q, wl, kv, pt, sl, scale)
    kw = dict(scale=scale, pool_kernel=7, pool_type="max", square=False, block_t=32)
    a = score_gather(q, wl, kv, pt, sl, window_lse=lse, **kw)
    b = score_gather(q, wl, kv, pt, sl, window_lse=None, **kw)
    assert_close_scores(b.scores, a.scores, TOL[dtype] / 5, "two-pass vs lse scores")
    assert_close_scores(b.mass, a.mass, TOL[dtype] / 5, "two-pass vs lse mass")


def test_mass_sums_to_window_queries(device):
    """Every valid window query's probabilities sum to 1: sum_t mass = Hq * window_len."""
    seq_lens = [40, 3, 77]
    win = [6, 3, 1]
    G, Hkv = 4, 2
    q, wl, kv, pt, sl = score_inputs(
        seq_lens, win, Hkv=Hkv, G=G, D=16, block_size=32, dtype=torch.float16, device=device, seed=3
    )
    out = score_gather(
        q, wl, kv, pt, sl, scale=0.3, window_lse=None, pool_kernel=1, pool_type="max", square=False, block_t=16
    )
    tot = out.mass.sum(dim=(1, 2)).cpu()
    torch.testing.assert_close(tot, torch.tensor([G * Hkv * w for w in win], dtype=torch.float32), rtol=1e-4, atol=1e-4)


def test_non_pow2_head_size_and_lse_garbage(device):
    """D = 24 (masked head dim); NaN in padding rows of window_lse; max_seq_len defaults to max(seq_lens)."""
    seq_lens = [21, 50]
    win = [4, 2]
    q, wl, kv, pt, sl = score_inputs(
        seq_lens, win, Hkv=1, G=3, D=24, block_size=16, dtype=torch.bfloat16, device=device, seed=11
    )
    lse = window_lse_batch(q, wl, kv, pt, sl, 0.2, fill=float("nan"))
    kw = dict(scale=0.2, pool_kernel=5, pool_type="max", square=True)
    out = score_gather(q, wl, kv, pt, sl, window_lse=lse, block_t=16, **kw)
    assert out.scores.shape == (2, 1, 50)
    _check(out, score_gather_reference(q, wl, kv, pt, sl, **kw), torch.bfloat16, "D=24")


def test_rejects_bad_arguments(device):
    shapes = dict(Hkv=2, G=2, D=16, block_size=16, dtype=torch.bfloat16, device=device)
    q, wl, kv, pt, sl = score_inputs([5], [2], **shapes, seed=0)
    with pytest.raises(ValueError):
        score_gather(q, wl, kv, pt, sl, scale=1.0, window_lse=None, pool_kernel=4, pool_type="max", square=False)
    with pytest.raises(ValueError):
        score_gather(q, wl, kv, pt, sl, scale=1.0, window_lse=None, pool_kernel=3, pool_type="median", square=False)
    with pytest.raises(ValueError):
        score_gather(
            q[:, :, :3], wl, kv, pt, sl, scale=1.0, window_lse=None, pool_kernel=3, pool_type="max", square=False
        )

"""The torch references against hand-written loops and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from vllm_kvcomp.kernels import reference as ref


def _naive_scores(q, k, scale, pool_kernel, pool_type, square):
    """Scalar loops in float64: the definition, written out."""
    W, Hq, D = q.shape
    P, Hkv, _ = k.shape
    G = Hq // Hkv
    q = q.double()
    k = k.double()
    a = torch.zeros(Hq, P, dtype=torch.float64)
    mass_h = torch.zeros(Hq, P, dtype=torch.float64)
    lse = torch.zeros(W, Hq, dtype=torch.float64)
    for h in range(Hq):
        kh = k[:, h // G]
        for i in range(W):
            pos = P - W + i
            logits = scale * (kh[: pos + 1] @ q[i, h])
            m = logits.max()
            e = torch.exp(logits - m)
            p = e / e.sum()
            lse[i, h] = m + math.log(e.sum())
            mass_h[h, : pos + 1] += p
            a[h, : pos + 1] += p * p if square else p
    half = pool_kernel // 2
    pooled = torch.zeros_like(a)
    for h in range(Hq):
        for t in range(P):
            lo, hi = max(0, t - half), min(P, t + half + 1)
            if pool_type == "max":
                pooled[h, t] = a[h, lo:hi].max()
            else:
                pooled[h, t] = a[h, lo:hi].sum() / pool_kernel
    scores = pooled.view(Hkv, G, P).sum(1)
    mass = mass_h.view(Hkv, G, P).sum(1)
    return scores, mass, lse


@pytest.mark.parametrize("W,P", [(1, 1), (1, 9), (4, 4), (3, 11)])
@pytest.mark.parametrize("pool_kernel,pool_type", [(1, "max"), (3, "max"), (5, "avg")])
@pytest.mark.parametrize("square", [False, True])
def test_window_scores_reference_matches_loops(W, P, pool_kernel, pool_type, square):
    torch.manual_seed(W * 100 + P + pool_kernel)
    Hkv, G, D = 2, 3, 8
    q = torch.randn(W, Hkv * G, D).to(torch.bfloat16)
    k = torch.randn(P, Hkv, D).to(torch.bfloat16)
    s, m = ref.window_scores_reference(q, k, scale=0.3, pool_kernel=pool_kernel, pool_type=pool_type, square=square)
    s2, m2, lse2 = _naive_scores(q, k, 0.3, pool_kernel, pool_type, square)
    assert s.dtype == torch.float32 and s.shape == (Hkv, P) and m.shape == (Hkv, P)
    torch.testing.assert_close(s.double(), s2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.double(), m2, rtol=1e-6, atol=1e-7)
    lse = ref.window_lse_reference(q, k, scale=0.3)
    torch.testing.assert_close(lse.double(), lse2, rtol=1e-6, atol=1e-6)
    # each window query's probabilities sum to 1: total mass = Hq * W
    assert abs(m.sum().item() - W * Hkv * G) < 1e-4


def test_gather_keys_values_follow_page_table():
    torch.manual_seed(0)
    kv = torch.randn(6, 2, 4, 2, 3)
    row = torch.tensor([5, 0, 3, 99], dtype=torch.int32)  # 99 = padding, never read
    keys = ref.gather_keys(kv, row, 10)
    vals = ref.gather_values(kv, row, 10)
    for t in range(10):
        assert torch.equal(keys[t], kv[int(row[t // 4]), 0, t % 4])
        assert torch.equal(vals[t], kv[int(row[t // 4]), 1, t % 4])


def test_select_reference_sinks_recent_ties():
    scores = torch.tensor([[0.0, 5.0, 1.0, 1.0, 1.0, 1.0, 9.0, 0.0]])
    # sinks {0}, recent {7}; remaining budget 3: 6 (9.0), 1 (5.0), then ties 2,3,4,5 -> lowest index 2
    idx = ref.select_keep_indices_reference(scores, 5, num_sinks=1, num_recent=1)
    assert idx.tolist() == [[0, 1, 2, 6, 7]]
    assert idx.dtype == torch.int64
    # keep == P keeps all
    assert ref.select_keep_indices_reference(scores, 8, 1, 1).tolist() == [list(range(8))]
    with pytest.raises(AssertionError):
        ref.select_keep_indices_reference(scores, 1, num_sinks=1, num_recent=1)


def test_compact_reference_small_case():
    kv = torch.arange(2 * 2 * 2 * 2 * 1, dtype=torch.float32).view(2, 2, 2, 2, 1)  # 2 pages of 2 slots
    pt = torch.tensor([[1, 0]], dtype=torch.int32)  # logical 0,1 -> page 1; 2,3 -> page 0
    keep_idx = torch.tensor([[[1, 3], [2, 3]]], dtype=torch.int32)
    out = ref.compact_reference(kv, pt, keep_idx, torch.tensor([2]), torch.tensor([4]))
    exp = kv.clone()
    exp[1, :, 0, 0] = kv[1, :, 1, 0]  # head 0: slot 0 <- token 1
    exp[1, :, 1, 0] = kv[0, :, 1, 0]  # head 0: slot 1 <- token 3
    exp[1, :, 0, 1] = kv[0, :, 0, 1]  # head 1: slot 0 <- token 2
    exp[1, :, 1, 1] = kv[0, :, 1, 1]  # head 1: slot 1 <- token 3
    assert torch.equal(out, exp)

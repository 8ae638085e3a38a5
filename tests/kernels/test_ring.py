"""The decode-query ring's write kernel (`record_queries_`) against its torch reference.

Runs on the `device` fixture: CPU + TRITON_INTERPRET here, CUDA on the GPU machine."""

from __future__ import annotations

import pytest
import torch
from vllm_kvcomp.kernels import record_queries_, record_queries_reference

POISON = -4096.0  # exact in every dtype tested


def _case(num_tokens, num_heads, head_size, rows, dtype, device, seed, lse_width=None):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(num_tokens, num_heads, head_size, generator=g).to(dtype)
    lse = torch.randn(num_heads, lse_width or num_tokens, generator=g)  # FlashAttention's [H, T] (or wider)
    window = 4
    queries = torch.full((rows, window, num_heads, head_size), POISON, dtype=dtype)
    lse_rows = torch.full((rows, window, num_heads), POISON, dtype=torch.float32)
    scratch = rows * window - 1  # the last ring row: where every untracked token goes
    perm = torch.randperm(rows * window - 1, generator=g)[:num_tokens]
    dst = torch.where(torch.rand(num_tokens, generator=g) < 0.7, perm, torch.full_like(perm, scratch))
    dst = torch.cat([dst, torch.full((5,), scratch)])  # padding beyond T: never read
    return [t.to(device) for t in (queries, lse_rows, dst, query, lse)], scratch


@pytest.mark.parametrize(
    "num_tokens,num_heads,head_size",
    [(1, 1, 1), (7, 14, 64), (33, 12, 128), (64, 32, 64), (5, 3, 40)],  # odd heads and head sizes too
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ring_write_matches_the_reference(device, num_tokens, num_heads, head_size, dtype):
    rows = max(9, num_tokens)  # room for every token in its own ring row
    (queries, lse_rows, dst, query, lse), scratch = _case(num_tokens, num_heads, head_size, rows, dtype, device, seed=1)
    want_q, want_l = queries.clone(), lse_rows.clone()
    record_queries_reference(want_q, want_l, dst, query, lse)
    record_queries_(queries, lse_rows, dst, query, lse)
    ring = queries.view(-1, num_heads, head_size)
    written = torch.zeros(ring.shape[0], dtype=torch.bool, device=ring.device)
    written[dst[:num_tokens]] = True
    written[scratch] = False  # duplicates: arbitrary in both
    assert torch.equal(ring[written], want_q.view(-1, num_heads, head_size)[written])
    assert torch.equal(lse_rows.view(-1, num_heads)[written], want_l.view(-1, num_heads)[written])
    # every other row keeps its poison: nothing written outside dst[:T]
    untouched = ~written
    untouched[scratch] = False
    assert (ring[untouched] == POISON).all() and (lse_rows.view(-1, num_heads)[untouched] == POISON).all()
    # the tracked tokens' rows hold exactly their query and LSE
    for t in range(num_tokens):
        if int(dst[t]) != scratch:
            assert torch.equal(ring[dst[t]], query[t])
            assert torch.equal(lse_rows.view(-1, num_heads)[dst[t]], lse[:, t])


def test_ring_write_reads_a_strided_lse_and_query(device):
    """FlashAttention's LSE is [H, T_padded] and the query a view of a wider tensor: strides, not copies."""
    (queries, lse_rows, dst, _, lse), scratch = _case(6, 4, 32, 5, torch.bfloat16, device, seed=3, lse_width=11)
    wide = torch.randn(6, 4, 48, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(device)
    query = wide[:, :, :32]  # head dim unit-stride, token and head strides of the wider tensor
    want_q, want_l = queries.clone(), lse_rows.clone()
    record_queries_reference(want_q, want_l, dst, query, lse)
    record_queries_(queries, lse_rows, dst, query, lse)
    keep = torch.ones(queries.view(-1, 4, 32).shape[0], dtype=torch.bool, device=queries.device)
    keep[scratch] = False
    assert torch.equal(queries.view(-1, 4, 32)[keep], want_q.view(-1, 4, 32)[keep])
    assert torch.equal(lse_rows.view(-1, 4)[keep], want_l.view(-1, 4)[keep])


def test_ring_write_refuses_buffers_that_do_not_fit(device):
    (queries, lse_rows, dst, query, lse), _ = _case(3, 4, 16, 4, torch.float32, device, seed=5)
    with pytest.raises(ValueError, match="do not fit"):
        record_queries_(queries, lse_rows, dst, query[:, :2], lse)
    with pytest.raises(ValueError, match="unit-stride"):
        record_queries_(queries, lse_rows, dst, query.transpose(1, 2).contiguous().transpose(1, 2), lse)

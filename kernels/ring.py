"""The decode-query ring's write: one layer's query rows and their LSE into ring rows, one launch.

Attention runs it for every layer at every step, inside the captured CUDA graphs
(engine/decode_ring.py), so it is one Triton launch instead of torch's two
`index_copy_` (queries, LSE; the LSE is read transposed). A program per token:
it reads the token's ring row from `dst` and copies the token's [H, D] query and
its H log-sum-exps there. Untracked tokens
all point at the scratch row (duplicate destinations: that row is left
arbitrary and never read, as with `index_copy_`).

One configuration, no autotune: the kernel moves one token's query (at most a
few KB) per program and is launched inside graph capture, where autotune could
not time anything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting
from .reference import record_queries_reference

__all__ = ["record_queries_"]


# Strides and counts vary with the batch's padded size: not specialized, so no graph size compiles anew.
@triton.jit(do_not_specialize=["stride_qt", "stride_qh", "stride_lh", "stride_lt", "num_heads", "head_size"])
def _record_queries_kernel(
    query_ptr,
    lse_ptr,
    dst_ptr,
    out_query_ptr,
    out_lse_ptr,
    stride_qt,
    stride_qh,
    stride_lh,
    stride_lt,
    num_heads,
    head_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    row = tl.load(dst_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask_h = h < num_heads
    mask = mask_h[:, None] & (d[None, :] < head_size)
    q = tl.load(query_ptr + t.to(tl.int64) * stride_qt + h[:, None] * stride_qh + d[None, :], mask=mask)
    out = out_query_ptr + row * num_heads * head_size + h[:, None] * head_size + d[None, :]
    tl.store(out, q.to(out_query_ptr.dtype.element_ty), mask=mask)
    lse = tl.load(lse_ptr + h * stride_lh + t.to(tl.int64) * stride_lt, mask=mask_h)
    tl.store(out_lse_ptr + row * num_heads + h, lse.to(out_lse_ptr.dtype.element_ty), mask=mask_h)


def record_queries_(
    queries: torch.Tensor, lse_rows: torch.Tensor, dst: torch.Tensor, query: torch.Tensor, lse: torch.Tensor
) -> None:
    """Write token t's query `query[t]` ([T, H, D]) and LSE `lse[:, t]` ([H, >= T]) into ring row
    `dst[t]` of `queries` ([..., H, D], rows contiguous) and `lse_rows` ([..., H]), for t < T.

    Capturable: fixed shapes, no host data, no allocation."""
    num_tokens, num_heads, head_size = query.shape
    if num_tokens == 0:
        return
    if query.stride(2) != 1 or not queries.is_contiguous() or not lse_rows.is_contiguous():
        raise ValueError("record_queries_ needs a unit-stride head dim and contiguous ring buffers")
    if queries.shape[-2:] != (num_heads, head_size) or lse_rows.shape[-1] != num_heads or lse.shape[0] != num_heads:
        raise ValueError(
            f"ring buffers {tuple(queries.shape)} / {tuple(lse_rows.shape)} do not fit {tuple(query.shape)}"
        )
    if query.device.type != "cuda" and not interpreting():
        record_queries_reference(queries, lse_rows, dst, query, lse)
        return
    launch = {} if interpreting() else {"num_warps": 2 if num_heads * head_size <= 2048 else 4}
    _record_queries_kernel[(num_tokens,)](
        query,
        lse,
        dst,
        queries,
        lse_rows,
        query.stride(0),
        query.stride(1),
        lse.stride(0),
        lse.stride(1),
        num_heads,
        head_size,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_size),
        **launch,
    )

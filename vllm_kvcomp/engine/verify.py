"""Self-check of the eviction path inside a running engine (tests and debugging).

Off unless `VLLM_KVCOMP_VERIFY=N` is set (N = requests to check per worker).
For a checked request the runtime snapshots every layer's prompt K/V before
compaction; afterwards this module reads each layer back through the page table
the attention backend will use and checks that

  * it holds exactly the selected tokens of each KV head, in order, then the
    boundary block (bit-exact), and
  * FlashAttention over that page table (the kernel vLLM runs) matches dense
    fp32 attention over the same kept tokens for a random query.

`VLLM_KVCOMP_FORCE_KEEP=a:b` makes the scorer an oracle that always keeps prompt
positions [a, b) (a planted needle); the check then also requires the needle in
every layer and head.
"""

from __future__ import annotations

import os

import torch

from vllm_kvcomp.engine.layout import EvictionPlan, cdiv
from vllm_kvcomp.engine.page_tables import build_layer_page_tables

VERIFY_ENV = "VLLM_KVCOMP_VERIFY"
FORCE_KEEP_ENV = "VLLM_KVCOMP_FORCE_KEEP"


def forced_range() -> tuple[int, int] | None:
    text = os.environ.get(FORCE_KEEP_ENV)
    if not text:
        return None
    start, end = (int(x) for x in text.split(":"))
    return start, end


class Verifier:
    def __init__(self) -> None:
        self.remaining = int(os.environ.get(VERIFY_ENV, "0") or 0)
        self.force_keep = forced_range()

    def wants(self) -> bool:
        return self.remaining > 0

    def snapshot(self, runtime, req) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Dense prompt K/V of every layer, [P, Hkv, D] each."""
        self.remaining -= 1
        pages_per_layer = cdiv(req.prompt_len, runtime.block_size)
        row = torch.tensor(req.block_ids[:pages_per_layer], dtype=torch.long, device=runtime.device)
        out = []
        for layer in range(runtime.num_layers):
            kv = read_pages(runtime, row + layer * runtime.blocks_per_layer, req.prompt_len)
            out.append((kv[0].clone(), kv[1].clone()))
        return out

    def check(self, runtime, req, plan: EvictionPlan, keep_by_layer: dict, snapshot) -> dict:
        dev, bs, L = runtime.device, runtime.block_size, runtime.num_layers
        row = torch.zeros(1, runtime.width, dtype=torch.int32, device=dev)
        row[0, : len(req.block_ids)] = torch.tensor(req.block_ids, dtype=torch.int32, device=dev)
        tables = torch.zeros(L, 1, runtime.width, dtype=torch.int32, device=dev)
        lens = torch.zeros(L, 1, dtype=torch.int32, device=dev)
        build_layer_page_tables(
            row,
            torch.tensor([req.prompt_len], dtype=torch.int32, device=dev),
            torch.tensor([req.index], dtype=torch.int32, device=dev),
            1,
            runtime.state,
            runtime.entries,
            tables,
            lens,
            runtime.blocks_per_layer,
            bs,
        )
        exact, needle, max_err = True, True, 0.0
        boundary = plan.full_blocks * bs
        for layer in range(L):
            keys, values = snapshot[layer]
            live = int(lens[layer, 0])
            pages = tables[layer, 0, : cdiv(live, bs)].long()
            kv = read_pages(runtime, pages, live)
            if layer in keep_by_layer:
                idx = keep_by_layer[layer].long()  # [H, c * bs], ascending
                heads = torch.arange(runtime.num_kv_heads, device=dev).view(-1, 1)
                exp_k = torch.cat([keys[idx, heads].transpose(0, 1), keys[boundary:]], 0)
                exp_v = torch.cat([values[idx, heads].transpose(0, 1), values[boundary:]], 0)
                if self.force_keep is not None:
                    start, end = self.force_keep
                    wanted = torch.arange(start, min(end, boundary), device=dev)
                    needle &= bool(torch.isin(wanted.view(1, -1), idx).all())
            else:
                exp_k, exp_v = keys, values
            if exp_k.shape[0] != live:
                exact = False
                continue
            exact &= bool(torch.equal(kv[0], exp_k) and torch.equal(kv[1], exp_v))
            query = torch.randn(1, runtime.num_heads, runtime.head_size, device=dev, dtype=runtime.pool.dtype)
            got = _paged_attention(runtime, query, tables[layer], lens[layer], live)
            ref = _dense_attention(query, exp_k, exp_v, runtime.scale)
            max_err = max(max_err, float((got.float() - ref).norm() / ref.norm().clamp_min(1e-12)))
        return {"exact": exact, "needle": needle, "attention_rel_err": max_err}


def read_pages(runtime, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens [0, length) of the given pages of the pool, as [2 (K, V), length, Hkv, D]."""
    kv = runtime.pool[pages].transpose(0, 1)  # [2, n, bs, Hkv, D]
    return kv.reshape(2, -1, runtime.num_kv_heads, runtime.head_size)[:, :length]


def _dense_attention(query, keys, values, scale):
    groups = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(groups, dim=1)
    v = values.float().repeat_interleave(groups, dim=1)
    logits = torch.einsum("hd,thd->ht", query[0].float(), k) * scale
    return torch.einsum("ht,thd->hd", logits.softmax(-1), v).unsqueeze(0)


def _paged_attention(runtime, query, table, lens, live):
    """The attention vLLM runs after compression: FlashAttention over the page table."""
    if not runtime.pool.is_cuda:
        pages = table[0, : cdiv(live, runtime.block_size)].long()
        kv = read_pages(runtime, pages, live)
        return _dense_attention(query, kv[0], kv[1], runtime.scale)
    from vllm.v1.attention.backends import fa_utils

    key_cache, value_cache = runtime.pool.unbind(1)
    fa_version = fa_utils.get_flash_attn_version()
    return fa_utils.flash_attn_varlen_func(
        q=query,
        k=key_cache,
        v=value_cache,
        cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device=query.device),
        max_seqlen_q=1,
        seqused_k=lens,
        max_seqlen_k=live,
        softmax_scale=runtime.scale,
        causal=True,
        block_table=table,
        fa_version=fa_version,
    )

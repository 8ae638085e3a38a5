"""Self-check of the eviction path inside a running engine (tests and debugging).

Off unless `VLLM_KVCOMP_VERIFY=N` is set (N = requests to check per worker);
nothing here runs on the hot path when it is off. For a checked request the
runtime snapshots every layer's prompt K/V before compaction; afterwards the
`Verifier` reads each layer back through the page table the attention backend
will use and checks that

  * it holds exactly the selected tokens of each KV head, in order, then the
    boundary block (bit-exact), and
  * FlashAttention over that page table (the kernel vLLM runs) matches dense
    fp32 attention over the same kept tokens for a random query.

`VLLM_KVCOMP_OBSERVER=/path/file.py:Name` (or `module:Name`) installs another
`EvictionObserver` instead, e.g. the tests' needle oracle
(tests/engine/needle_oracle.py), which also rewrites the selection scores.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any

import torch

from vllm_kvcomp.engine.layout import EvictionPlan, cdiv
from vllm_kvcomp.engine.page_tables import build_layer_page_tables

if TYPE_CHECKING:
    from vllm_kvcomp.engine.requests import TrackedRequest
    from vllm_kvcomp.engine.runtime import CompressionRuntime

VERIFY_ENV = "VLLM_KVCOMP_VERIFY"
OBSERVER_ENV = "VLLM_KVCOMP_OBSERVER"

Snapshot = list[tuple[torch.Tensor, torch.Tensor]]


class EvictionObserver:
    """Hook around one eviction batch; the runtime calls it only while `wants()`."""

    # Optional rewrite of the selection scores [rows, H, S] before top-k.
    score_hook: Any = None

    def wants(self) -> bool:
        return False

    def before(self, stage: str, args: tuple) -> None:
        """Called before each eviction stage ("score", "plan", "compact", and "relocate" after
        compaction); may raise (fault injection)."""

    def snapshot(self, runtime: CompressionRuntime, req: TrackedRequest) -> Snapshot:
        raise NotImplementedError

    def check(
        self, runtime: CompressionRuntime, req: TrackedRequest, plan: EvictionPlan | None, keep_by_layer, snapshot
    ) -> dict[str, Any]:
        raise NotImplementedError


def load_observer() -> EvictionObserver | None:
    """The observer the environment asks for (None: the hot path runs alone)."""
    spec = os.environ.get(OBSERVER_ENV)
    if spec:
        where, _, name = spec.rpartition(":")
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location("vllm_kvcomp_observer", where)
            assert module_spec is not None and module_spec.loader is not None, f"{OBSERVER_ENV}: cannot load {where}"
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        return getattr(module, name)()
    if int(os.environ.get(VERIFY_ENV, "0") or 0) > 0:
        return Verifier()
    return None


class Verifier(EvictionObserver):
    def __init__(self) -> None:
        self.remaining = int(os.environ.get(VERIFY_ENV, "0") or 0)

    def wants(self) -> bool:
        return self.remaining > 0

    def snapshot(self, runtime, req) -> Snapshot:
        """Dense prompt K/V of every layer, [P, Hkv, D] each."""
        self.remaining -= 1
        g = runtime.geometry
        row = torch.tensor(req.block_ids[: cdiv(req.prompt_len, g.block_size)], dtype=torch.long, device=runtime.device)
        out = []
        for layer in range(g.num_layers):
            kv = read_pages(runtime, row + layer * g.blocks_per_layer, req.prompt_len)
            out.append((kv[0].clone(), kv[1].clone()))
        return out

    def check(self, runtime, req, plan, keep_by_layer, snapshot) -> dict[str, Any]:
        assert plan is not None
        tables, lens = _request_page_tables(runtime, req)
        g, dev = runtime.geometry, runtime.device
        exact, max_err = True, 0.0
        boundary = plan.full_blocks * g.block_size
        for layer in range(g.num_layers):
            keys, values = snapshot[layer]
            live = int(lens[layer, 0])
            kv = read_pages(runtime, tables[layer, 0, : cdiv(live, g.block_size)].long(), live)
            if layer in keep_by_layer:
                idx = keep_by_layer[layer].long()  # [H, c * bs], ascending
                heads = torch.arange(g.num_kv_heads, device=dev).view(-1, 1)
                exp_k = torch.cat([keys[idx, heads].transpose(0, 1), keys[boundary:]], 0)
                exp_v = torch.cat([values[idx, heads].transpose(0, 1), values[boundary:]], 0)
            else:
                exp_k, exp_v = keys, values
            if exp_k.shape[0] != live:
                exact = False
                continue
            exact &= bool(torch.equal(kv[0], exp_k) and torch.equal(kv[1], exp_v))
            query = torch.randn(1, g.num_heads, g.head_size, device=dev, dtype=runtime.pool.dtype)
            got = _paged_attention(runtime, query, tables[layer], lens[layer], live)
            ref = _dense_attention(query, exp_k, exp_v, g.scale)
            max_err = max(max_err, float((got.float() - ref).norm() / ref.norm().clamp_min(1e-12)))
        return {"exact": exact, "attention_rel_err": max_err}


def _request_page_tables(runtime, req) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, 1, width] page table and [L, 1] lengths of one request, as attention would read them."""
    g, dev = runtime.geometry, runtime.device
    row = torch.zeros(1, runtime.width, dtype=torch.int32, device=dev)
    row[0, : len(req.block_ids)] = torch.tensor(req.block_ids, dtype=torch.int32, device=dev)
    tables = torch.zeros(g.num_layers, 1, runtime.width, dtype=torch.int32, device=dev)
    lens = torch.zeros(g.num_layers, 1, dtype=torch.int32, device=dev)
    build_layer_page_tables(
        row,
        torch.tensor([req.prompt_len], dtype=torch.int32, device=dev),
        torch.tensor([req.index], dtype=torch.int32, device=dev),
        1,
        runtime.pages.layouts,
        tables,
        lens,
        g.blocks_per_layer,
        g.block_size,
    )
    return tables, lens


def read_pages(runtime, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens [0, length) of the given pages of the pool, as [2 (K, V), length, Hkv, D]."""
    g = runtime.geometry
    kv = runtime.pool[pages].transpose(0, 1)  # [2, n, bs, Hkv, D]
    return kv.reshape(2, -1, g.num_kv_heads, g.head_size)[:, :length]


def _dense_attention(query, keys, values, scale):
    groups = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(groups, dim=1)
    v = values.float().repeat_interleave(groups, dim=1)
    logits = torch.einsum("hd,thd->ht", query[0].float(), k) * scale
    return torch.einsum("ht,thd->hd", logits.softmax(-1), v).unsqueeze(0)


def _paged_attention(runtime, query, table, lens, live):
    """The attention vLLM runs after compression: FlashAttention over the page table."""
    g = runtime.geometry
    if not runtime.pool.is_cuda:
        pages = table[0, : cdiv(live, g.block_size)].long()
        kv = read_pages(runtime, pages, live)
        return _dense_attention(query, kv[0], kv[1], g.scale)
    from vllm.v1.attention.backends import fa_utils

    key_cache, value_cache = runtime.pool.unbind(1)
    return fa_utils.flash_attn_varlen_func(
        q=query,
        k=key_cache,
        v=value_cache,
        cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device=query.device),
        max_seqlen_q=1,
        seqused_k=lens,
        max_seqlen_k=live,
        softmax_scale=g.scale,
        causal=True,
        block_table=table,
        fa_version=fa_utils.get_flash_attn_version(),
    )

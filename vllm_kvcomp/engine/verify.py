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

Decode-time evictions (engine/decode_eviction.py) are checked the same way, for
up to N more requests: the snapshot is each layer's live logical tokens (read
through the request's page tables before the rewrite), and after publish every
layer must read its kept logical tokens per KV head, in order, then its tail.
The snapshot also checks the decode-query ring (engine/decode_ring.py), which the
attention op fills inside CUDA graphs: the LSE recomputed from the ring's last W
queries over the live keys must equal the LSE FlashAttention recorded beside them
(`ring_lse_abs_err`; None when a query ran before the last eviction).

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
    from vllm_kvcomp.engine.reeviction import ReevictionPlan
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

    # Decode-time evictions (engine/decode_eviction.py): the same hooks, keyed on the context.
    def wants_decode(self) -> bool:
        return False

    def snapshot_decode(self, runtime: CompressionRuntime, req: TrackedRequest) -> Snapshot:
        raise NotImplementedError

    def check_decode(
        self, runtime: CompressionRuntime, req: TrackedRequest, row: list[int], plan: ReevictionPlan, keep_by_layer,
        snapshot,
    ) -> dict[str, Any]:  # fmt: skip
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
        self.decode_remaining = self.remaining  # its own count: prefill checks do not use it up
        self._ring_lse_err: float | None = None  # snapshot_decode's ring check, reported by check_decode

    def wants(self) -> bool:
        return self.remaining > 0

    def wants_decode(self) -> bool:
        return self.decode_remaining > 0

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
        boundary = plan.full_blocks * runtime.geometry.block_size
        expected = [_kept(runtime, kv, keep_by_layer.get(layer), boundary) for layer, kv in enumerate(snapshot)]
        return _compare(runtime, *_request_page_tables(runtime, req.block_ids, req.index, req.prompt_len), expected)

    def snapshot_decode(self, runtime, req) -> Snapshot:
        """Each layer's live logical K/V at the request's context, [live_l, Hkv, D]: what attention
        reads through its page tables before the eviction (compacted pages, then the tail)."""
        self.decode_remaining -= 1
        tables, lens = _request_page_tables(runtime, req.block_ids, req.index, req.seq_len)
        out = []
        for layer in range(runtime.geometry.num_layers):
            kv = _read_layer(runtime, tables, lens, layer)
            out.append((kv[0].clone(), kv[1].clone()))
        self._ring_lse_err = ring_lse_error(runtime, req, [keys for keys, _ in out])
        return out

    def check_decode(self, runtime, req, row, plan, keep_by_layer, snapshot) -> dict[str, Any]:
        """After publish, through the new row: kept logical tokens (keep indices are logical
        positions in the layer's domain) then the tokens after the domain, per layer."""
        bs = runtime.geometry.block_size
        expected = [
            _kept(runtime, kv, keep_by_layer.get(layer), int(plan.domain_pages[layer]) * bs)
            for layer, kv in enumerate(snapshot)
        ]
        result = _compare(runtime, *_request_page_tables(runtime, row, req.index, req.seq_len), expected)
        return {**result, "ring_lse_abs_err": self._ring_lse_err}


def ring_lse_error(runtime, req: TrackedRequest, live_keys: list[torch.Tensor]) -> float | None:
    """Largest |LSE recomputed from the ring's queries - LSE recorded with them| over layers, window
    rows and heads. Ring row w is the query of position seq_len - W + w; it attended to the live keys
    up to itself, i.e. all but the last W - 1 - w (the window's own causal mask). None when some row
    ran before the last eviction (its keys are gone, as for the scorer, which then recomputes LSE)."""
    from vllm_kvcomp.kernels.reference import window_lse_reference

    ring = runtime.decode_ring
    queries, lse = ring.gather([req], [req.seq_len])  # [L, 1, W, H, D], [L, 1, W, H]
    if lse is None:
        return None
    err = 0.0
    for layer, keys in enumerate(live_keys):
        ref = window_lse_reference(queries[layer, 0], keys, scale=runtime.geometry.scale)  # [W, H]
        err = max(err, float((ref - lse[layer, 0].float()).abs().max()))
    return err


def _kept(runtime, kv, keep: torch.Tensor | None, boundary: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a layer must read after the eviction: per KV head its kept tokens `keep` [Hkv, k]
    (ascending indices into `kv`), then `kv[boundary:]`; a layer not evicted reads `kv` unchanged."""
    keys, values = kv
    if keep is None:
        return keys, values
    idx = keep.long()
    heads = torch.arange(runtime.geometry.num_kv_heads, device=runtime.device).view(-1, 1)
    return (
        torch.cat([keys[idx, heads].transpose(0, 1), keys[boundary:]], 0),
        torch.cat([values[idx, heads].transpose(0, 1), values[boundary:]], 0),
    )


def _compare(runtime, tables, lens, expected) -> dict[str, Any]:
    """Every layer read back bit-exact, and paged attention over it against dense attention."""
    g, dev = runtime.geometry, runtime.device
    exact, max_err = True, 0.0
    for layer, (exp_k, exp_v) in enumerate(expected):
        live = int(lens[layer, 0])
        if exp_k.shape[0] != live:
            exact = False
            continue
        kv = _read_layer(runtime, tables, lens, layer)
        exact &= bool(torch.equal(kv[0], exp_k) and torch.equal(kv[1], exp_v))
        query = torch.randn(1, g.num_heads, g.head_size, device=dev, dtype=runtime.pool.dtype)
        got = _paged_attention(runtime, query, tables[layer], lens[layer], live)
        ref = _dense_attention(query, exp_k, exp_v, g.scale)
        max_err = max(max_err, float((got.float() - ref).norm() / ref.norm().clamp_min(1e-12)))
    return {"exact": exact, "attention_rel_err": max_err}


def _read_layer(runtime, tables, lens, layer: int) -> torch.Tensor:
    live = int(lens[layer, 0])
    return read_pages(runtime, tables[layer, 0, : cdiv(live, runtime.geometry.block_size)].long(), live)


def _request_page_tables(runtime, block_ids: list[int], index: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, 1, width] page table and [L, 1] lengths of one request (row `block_ids`, runner slot
    `index`, context `seq_len`) as attention would read them with the published layouts."""
    g, dev = runtime.geometry, runtime.device
    row = torch.zeros(1, runtime.width, dtype=torch.int32, device=dev)
    row[0, : len(block_ids)] = torch.tensor(block_ids, dtype=torch.int32, device=dev)
    tables = torch.zeros(g.num_layers, 1, runtime.width, dtype=torch.int32, device=dev)
    lens = torch.zeros(g.num_layers, 1, dtype=torch.int32, device=dev)
    build_layer_page_tables(
        row,
        torch.tensor([seq_len], dtype=torch.int32, device=dev),
        torch.tensor([index], dtype=torch.int32, device=dev),
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

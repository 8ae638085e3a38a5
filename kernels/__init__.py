"""Triton kernels of vllm-kvcomp (installed as ``vllm_kvcomp.kernels``).

* ``score_gather``: SnapKV observation-window scores read from the paged cache.
* ``compact_kv_``: in-place compaction of survivors per (row, KV head).
* ``copy_pages_``: whole-page copies.
* ``record_queries_``: the decode-query ring's write (queries and LSE), one launch per layer.
* ``select_keep_indices``: per-head top-k with forced sinks / recent window.
* ``reference``: plain-torch oracles (also the CPU path).
* ``forced_keep_mask``: the sinks + recent tokens eviction always keeps (``common``).

Modules: ``score_gather`` (host side), ``score_gather_kernels`` (jitted,
autotuned) and ``score_gather_configs`` (their candidates, keys, pruning),
``compaction``, ``ring``, ``reference``, ``common`` (interpreter check, forced mask,
autotune policy).
"""

from .common import forced_keep_mask
from .compaction import KEEP_IDX_SENTINEL, compact_kv_, copy_pages_, select_keep_indices
from .reference import (
    ScoreOutput,
    compact_reference,
    copy_pages_reference,
    gather_keys,
    gather_kv,
    gather_values,
    record_queries_reference,
    score_gather_reference,
    select_keep_indices_batched_reference,
    select_keep_indices_reference,
    window_lse_reference,
    window_scores_reference,
)
from .ring import record_queries_
from .score_gather import score_gather

__all__ = [
    "KEEP_IDX_SENTINEL",
    "ScoreOutput",
    "compact_kv_",
    "compact_reference",
    "copy_pages_",
    "copy_pages_reference",
    "forced_keep_mask",
    "gather_keys",
    "gather_kv",
    "gather_values",
    "record_queries_",
    "record_queries_reference",
    "score_gather",
    "score_gather_reference",
    "select_keep_indices",
    "select_keep_indices_batched_reference",
    "select_keep_indices_reference",
    "window_lse_reference",
    "window_scores_reference",
]

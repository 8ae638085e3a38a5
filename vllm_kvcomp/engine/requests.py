"""The worker's view of one request (one per running request, per worker)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.engine.layout import EvictionPlan
from vllm_kvcomp.engine.reeviction import ReevictionPlan, RequestLayout


@dataclass
class WindowRows:
    """A request's capture slot: where its observation-window queries are kept.

    Row r of the slot holds the query of prompt position `prompt_len - window + r`;
    `captured[r]` says whether the forward pass actually wrote it (rows that ran
    inside a FULL CUDA graph are not captured).
    """

    slot: int
    window: int
    captured: np.ndarray = field(repr=False)  # bool [window]
    failed: bool = False  # a capture of this request raised (it is then served uncompressed)

    def extent(self, prompt_len: int) -> tuple[int, int]:
        """(rows, scored length): the last contiguous run of captured rows, and the
        prompt length up to (and including) its last query."""
        last = int(np.flatnonzero(self.captured)[-1])
        first = last
        while first > 0 and self.captured[first - 1]:
            first -= 1
        return last - first + 1, prompt_len - self.window + last + 1


@dataclass
class DecodeState:
    """A request under decode-time eviction (engine/decode_eviction.py, docs/LIFETIME-BUDGETS.md).

    `ratios` are the prefill plan's per-layer budgets over its average budget: every
    decode eviction scales them to the average budget at its context (host arithmetic,
    no statistics read back). A request without prefill budgets has ratios of one.
    """

    layout: RequestLayout  # where its layers live after its last eviction
    evicted_at: int  # the context of its last eviction (the prompt length after the prefill)
    ratios: np.ndarray  # float64 [L]: B_l / B_avg
    deferred: int = 0  # decode evictions in a row that failed before rewriting anything
    stopped: bool = False  # no longer evicted (failed MAX_DEFERRED times, or after compaction)
    # The plan of its next eviction, made steps ahead (DecodePlanner.plan_ahead): (context, the
    # layout it was planned from, the plan or None for nothing to free). Used only if both match.
    next_plan: tuple[int, RequestLayout, ReevictionPlan | None] | None = None

    def planned(self, seq_len: int) -> tuple[bool, ReevictionPlan | None]:
        """(whether a plan made ahead holds for context `seq_len`, that plan)."""
        ahead = self.next_plan
        if ahead is None or ahead[0] != seq_len or ahead[1] is not self.layout:
            return False, None
        return True, ahead[2]

    @classmethod
    def after_prefill(
        cls, plan: EvictionPlan | None, budgets: np.ndarray | None, average: int, prompt_len: int, num_layers: int,
        block_size: int,
    ) -> DecodeState:  # fmt: skip
        """After the prefill eviction: its layout (uncompressed when it freed nothing) and ratios."""
        layout = (
            RequestLayout.from_plan(plan) if plan is not None else RequestLayout.uncompressed(num_layers, block_size)
        )
        if budgets is None or average <= 0:
            ratios = np.ones(num_layers, dtype=np.float64)
        else:
            ratios = np.asarray(budgets, dtype=np.float64) / average
        return cls(layout, prompt_len, ratios)


@dataclass
class TrackedRequest:
    req_id: str
    index: int  # vLLM V2 runner's request slot (row of the per-request state)
    block_ids: list[int]
    prompt_len: int
    compress: bool
    config: CompressionConfig | None = None  # per-request method/budget (None: the server's)
    rows: WindowRows | None = None  # set while its window is being captured
    finished: bool = False  # compressed, skipped, or nothing to do
    evicts_while_decoding: bool = False  # its config can free blocks while decoding (and the server has the ring)
    seq_len: int = 0  # its context after the last step that scheduled it (requests evicted while decoding)
    budgets: np.ndarray | None = None  # per-layer budgets of its prefill plan
    decode: DecodeState | None = None  # set while decode-time eviction follows it

    def window_captured(self) -> bool:
        return self.rows is not None and bool(self.rows.captured.any())

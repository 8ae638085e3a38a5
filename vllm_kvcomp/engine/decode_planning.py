"""The host side of decode-time eviction: budgets, plans and page tables (no GPU work).

`DecodePlanner` plans each request's next eviction (engine/reeviction.py) either
in its due step or, usually, in an earlier one (`plan_ahead`): a plan depends
only on the layout, the budgets and the context, all known `evict_every` tokens
ahead, and requests evicted together in one round would otherwise all be planned
in their due step while the GPU waits. `DecodeEvictor` (engine/decode_eviction.py)
takes the plans when the requests are due, and scores the pages
`logical_page_table` lists.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.engine.layout import cdiv
from vllm_kvcomp.engine.plan_cache import PlanCache
from vllm_kvcomp.engine.reeviction import ReevictionPlan, RequestLayout, plan_reeviction
from vllm_kvcomp.engine.requests import DecodeState, TrackedRequest
from vllm_kvcomp.policies.base import allocate

if TYPE_CHECKING:
    from vllm_kvcomp.engine.runtime import CompressionRuntime

logger = logging.getLogger("vllm.kvcomp")


def decode_budgets(ratios: np.ndarray, config: CompressionConfig, seq_len: int) -> np.ndarray:
    """Per-layer budgets at context `seq_len`: `ratios` times `average_budget(seq_len)`, made
    integers that sum to L * B_avg, each in [protected tokens, seq_len] (as the policies')."""
    average = config.average_budget(seq_len)
    ratios = np.asarray(ratios, dtype=np.float64)
    if np.all(ratios == ratios[0]):  # uniform (and requests without prefill statistics): every layer the average
        return np.full(len(ratios), average, dtype=np.int64)  # what `allocate` returns, without its cost
    floor = min(config.protected_tokens, seq_len)
    return allocate(ratios * average, len(ratios) * average, floor, seq_len)


def logical_pages(layout: RequestLayout, row, seq_len: int, blocks_per_layer: int) -> np.ndarray:
    """int64 [L, P]: each layer's pages at context `seq_len`, zero-padded: its compacted pages
    (entry table), then the stock pages of rows B.. (`layout_page_table_reference`, vectorised)."""
    return logical_page_table([layout], [np.asarray(row, dtype=np.int64)], [seq_len], blocks_per_layer)[:, 0]


def logical_page_table(
    layouts: list[RequestLayout], rows: list[np.ndarray], seq_lens: list[int], blocks_per_layer: int
) -> np.ndarray:
    """int64 [L, R, P]: `logical_pages` of R requests (int64 rows), padded to the longest, in one
    pass: the due step of a round builds it for every request at once."""
    R, L, N = len(layouts), layouts[0].num_layers, blocks_per_layer
    tails = [row[lay.tail_block : cdiv(s, lay.block_size)] for lay, row, s in zip(layouts, rows, seq_lens)]
    tail_lens = np.fromiter(map(len, tails), dtype=np.int64, count=R)
    compact = np.stack([lay.compact_pages for lay in layouts], axis=1)  # [L, R]
    P = max(int((compact + tail_lens).max()), 1)
    pages = np.zeros(L * R * P, dtype=np.int64)  # flat: layer l, request r, page j at (l * R + r) * P + j
    # compacted page j of layer l: its home (row position, layer slot) in the entry table at C_l + j
    sizes = [len(lay.homes) for lay in layouts]
    where = np.concatenate([lay.entry_layers * (R * P) + lay.entry_pages for lay in layouts])
    pages[where + np.repeat(np.arange(R) * P, sizes)] = np.concatenate(
        [lay.homes[:, 1] * N + row[lay.homes[:, 0]] for lay, row in zip(layouts, rows)]
    )
    if tail_lens.sum():  # page c_l + j of layer l: row B + j's block in layer l's region
        r = np.repeat(np.arange(R), tail_lens)
        j = np.arange(len(r)) - np.repeat(np.cumsum(tail_lens) - tail_lens, tail_lens)
        layer = np.arange(L).reshape(-1, 1)
        pages[layer * (R * P) + r * P + compact[:, r] + j] = layer * N + np.concatenate(tails)
    return pages.reshape(L, R, P)


def decode_state(req: TrackedRequest) -> DecodeState:
    assert req.decode is not None, f"{req.req_id} is not followed by decode-time eviction"
    return req.decode


class DecodePlanner:
    def __init__(self, runtime: CompressionRuntime, max_reqs: int = 256) -> None:
        self.rt = runtime
        self._cursor = 0  # plan_ahead's place in the stepped requests
        # Plans of shapes seen before, moved along the row (engine/plan_cache.py): under an integer
        # budget every eviction after a request's first is one. A running request has one or two
        # shapes in use (per-layer ratios differ per request under zigzag), so twice the running
        # requests are kept: fewer, and requests stepping round-robin would evict each other's.
        self.cache = PlanCache(size=2 * max_reqs)

    def plan(self, req: TrackedRequest, seq_len: int) -> ReevictionPlan | None:
        """Its eviction at context `seq_len` from its current layout (None: nothing to free)."""
        config, state = req.config or self.rt.config, decode_state(req)
        budgets = decode_budgets(state.ratios, config, seq_len)
        if not config.is_absolute_budget:  # a fraction's budgets grow with the context: no shape repeats
            return plan_reeviction(state.layout, budgets, seq_len, config.num_sinks, config.num_recent)
        return self.cache.plan(state.layout, budgets, seq_len, config.num_sinks, config.num_recent)

    def plans(self, reqs: list[TrackedRequest]) -> list[ReevictionPlan | None]:
        """The plans of requests due now: made ahead where they still hold, else made now."""
        plans = []
        for req in reqs:
            state = decode_state(req)
            ahead, plan = state.planned(req.seq_len)
            state.next_plan = None
            plans.append(plan if ahead else self.plan(req, req.seq_len))
        return plans

    def plan_ahead(self, req_ids: list[str], contexts: np.ndarray) -> None:
        """Plan the next eviction of a few requests, round-robin over those that stepped
        (`req_ids`, with their contexts after the step).

        Each step looks at about 4 / evict_every of the requests and plans those without
        a plan, so a round is planned within a quarter of an interval at O(1) host work
        per step. A plan is used only if the request reaches its due context in that
        layout (`DecodeState.planned`); else it is planned again when due.
        """
        n, every = len(contexts), self.rt.config.evict_every
        if not n or every is None:
            return
        look = min(n, 2 * cdiv(2 * n, every))
        start, self._cursor = self._cursor % n, (self._cursor + look) % n
        for k in range(look):
            position = (start + k) % n
            req = self.rt.requests.get(req_ids[position])
            if req is None or not req.evicts_while_decoding or req.decode is None:
                continue
            req.seq_len = int(contexts[position])
            state, req_every = req.decode, (req.config or self.rt.config).evict_every
            if state.stopped or req_every is None:
                continue
            due = state.evicted_at + req_every
            if due <= req.seq_len or state.planned(due)[0]:
                continue
            try:
                plan = self.plan(req, due)
                state.next_plan = (due, state.layout, plan.precompute() if plan is not None else None)
            except Exception:  # planned again when due, where a failure defers the eviction (logged there)
                logger.debug("vllm-kvcomp: %s: planning ahead failed", req.req_id, exc_info=True)

"""Decode-time plans for layout shapes seen before, moved along the row instead of made again.

A `ReevictionPlan` (engine/reeviction.py) depends on the request's layout (c, K, homes, B), the
budgets and the context S only through t - B (t = S // bs), S % bs and whether the layout has a hole
(B > K), except for the row positions at or after B, which move with B: the kept tail pages'
sources, the re-homed rows B..B+n-1, the freed rows B+n..t-1 and the new tail t. Positions before K
do not move (the homes, the freed rows K'..K-1, every relocation's destination and the new homes):
see `plan_reeviction`'s steps. So a plan made once serves every later eviction of the same shape,
moved by the difference of B, and equals what `plan_reeviction` would make (tested).

Under an integer budget every eviction after a request's first has the same shape: the layout an
eviction leaves is the one it started from with the tail moved on, so 126 of the 128 plans of a
16k-token life are cache hits (bench/decode_host_cost.py). Planning ahead was 18% of the plugin's
extra host time at the same batch (bench/results/lifetime/h200_stack_profile/). Under a fraction
the budget grows with S, no shape repeats, and `DecodePlanner` makes each plan without the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields

import numpy as np

from vllm_kvcomp.engine.reeviction import ReevictionPlan, RequestLayout, plan_reeviction

# Cached arrays (cached_property names) that do not depend on the tail row: a moved copy shares them.
_LAYOUT_TAIL_FREE = ("entry_offsets", "entry_layers", "entry_pages", "entry_array")
_PLAN_TAIL_FREE = ("domain_pages", "evicted_layers")


class PlanCache:
    """`plan_reeviction` with the plans of the last `size` shapes kept (least recently used dropped)."""

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._plans: OrderedDict[tuple, ReevictionPlan | None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def plan(
        self, layout: RequestLayout, budgets, seq_len: int, num_sinks: int = 0, num_recent: int = 0
    ) -> ReevictionPlan | None:
        """What `plan_reeviction(layout, budgets, seq_len, num_sinks, num_recent)` returns."""
        budgets = np.asarray(budgets, dtype=np.int64)
        bs, B = layout.block_size, layout.tail_block
        key = (
            layout.compact_pages.tobytes(),
            layout.kept_blocks,
            B > layout.kept_blocks,
            layout.homes.tobytes(),
            budgets.tobytes(),
            seq_len // bs - B,
            seq_len % bs,
            bs,
            num_sinks,
            num_recent,
        )
        if key in self._plans:
            self._plans.move_to_end(key)
            self.hits += 1
            cached = self._plans[key]
            return None if cached is None else moved(cached, layout, seq_len)
        self.misses += 1
        plan = plan_reeviction(layout, budgets, seq_len, num_sinks, num_recent)  # errors are not kept
        self._plans[key] = plan
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return plan


def moved(plan: ReevictionPlan, before: RequestLayout, seq_len: int) -> ReevictionPlan:
    """`plan` for `before`, a layout of the same shape whose tail row differs (module docstring)."""
    origin = plan.before.tail_block  # positions from here on are tail rows: they move
    shift = before.tail_block - origin
    relocations = plan.relocation_array.copy()
    relocations[:, 0] = _move(relocations[:, 0], origin, shift)
    result = ReevictionPlan(
        seq_len,
        before,
        with_tail(plan.after, plan.after.tail_block + shift),
        plan.rehome_sources + shift,
        relocations,
        _move(plan.freed_positions, origin, shift),
    )
    _share(plan, result, _PLAN_TAIL_FREE)
    return result


def with_tail(layout: RequestLayout, tail_block: int) -> RequestLayout:
    """The same compacted pages with the tail at row `tail_block`; shares the tail-free cached arrays.

    Of `RequestLayout`'s checks only those that involve the tail run again (K <= B, c <= B): the others
    (homes' shape, bounds and uniqueness) held for `layout` and read nothing that moved. They were half
    of the time of a moved plan."""
    if tail_block < layout.kept_blocks or tail_block < int(layout.compact_pages.max(initial=0)):
        raise ValueError(f"need K ({layout.kept_blocks}) <= B ({tail_block}) and c <= B")
    out = object.__new__(RequestLayout)  # the fields as __init__ sets them, without __post_init__
    out.__dict__.update({field.name: getattr(layout, field.name) for field in fields(RequestLayout)})
    out.__dict__["tail_block"] = tail_block
    _share(layout, out, _LAYOUT_TAIL_FREE)
    return out


def _move(positions: np.ndarray, origin: int, shift: int) -> np.ndarray:
    return np.where(positions >= origin, positions + shift, positions)


def _share(source, target, names: tuple[str, ...]) -> None:
    # cached_property keeps its value in the instance's __dict__ (frozen dataclasses included)
    for name in names:
        if name in source.__dict__:
            target.__dict__[name] = source.__dict__[name]

"""PlanCache: a plan moved from a cached one equals what plan_reeviction makes, field by field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcomp.engine.plan_cache import PlanCache, with_tail
from vllm_kvcomp.engine.reeviction import RequestLayout, plan_reeviction


def assert_same_plan(got, want) -> None:
    if want is None:
        assert got is None
        return
    assert got is not None and got.seq_len == want.seq_len
    for name in ("rehome_sources", "relocation_array", "freed_positions", "domain_pages", "evicted_layers"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for layout_got, layout_want in ((got.after, want.after), (got.before, want.before)):
        assert (layout_got.kept_blocks, layout_got.tail_block) == (layout_want.kept_blocks, layout_want.tail_block)
        for name in ("compact_pages", "homes", "shift_pages", "entry_offsets", "entry_array", "entry_pages"):
            np.testing.assert_array_equal(getattr(layout_got, name), getattr(layout_want, name), err_msg=name)


def life(cache, rng, layers, bs, prompt, steps, every, budgets_at, sinks, recent, check=True, jitter=True):
    """One request's evictions through `cache`, each checked against plan_reeviction (`jitter`: some
    intervals a block longer, as a request that was not due in a step)."""
    layout, seq_len = RequestLayout.uncompressed(layers, bs), prompt
    for step in range(steps):
        budgets = budgets_at(seq_len, step)
        want = plan_reeviction(layout, budgets, seq_len, sinks, recent)
        got = cache.plan(layout, budgets, seq_len, sinks, recent)
        if check:
            assert_same_plan(got, want)
        if want is not None:
            got.precompute()  # as plan_ahead does: the moved plan's shared arrays must be complete
            layout = got.after
        seq_len += every + (int(rng.integers(0, 2)) * bs if jitter else 0)
    return layout


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    layers=st.integers(1, 6),
    bs=st.sampled_from([4, 16]),
    budget=st.integers(1, 120),
    per_layer=st.booleans(),
    prompt=st.integers(1, 300),
    sinks=st.integers(0, 4),
    recent=st.sampled_from([0, 16]),
)
def test_cached_plans_equal_fresh_ones_over_lives(seed, layers, bs, budget, per_layer, prompt, sinks, recent):
    rng = np.random.default_rng(seed)
    ratios = rng.uniform(0.3, 2.0, layers) if per_layer else np.ones(layers)
    fixed = np.maximum((ratios * budget).astype(np.int64), 1)
    cache = PlanCache(size=64)
    every = 2 * bs
    for prompt_len in (prompt, prompt + 3 * bs):  # two requests of one shape, B apart: one cache
        life(cache, rng, layers, bs, prompt_len, 12, every, lambda s, k: fixed, sinks, recent)
    # budgets that shrink step by step (rows K'..K-1 freed, their kept pages relocated), the same for
    # two requests B apart: the second one's plans are moved from the first one's
    # (prompts longer than every budget: no layer's domain caps its pages, so both lives have one shape)
    shrinking = [np.maximum(fixed * 4 // (4 + k), 1) for k in range(10)]
    hits = cache.hits
    for prompt_len in (int(fixed.max()) + prompt + 8 * bs, int(fixed.max()) + prompt + 11 * bs):
        life(cache, rng, layers, bs, prompt_len, 10, every, lambda s, k: shrinking[k], sinks, recent, jitter=False)
    assert cache.hits > hits  # the second life is moved from the first one's plans
    # a fraction budget: each plan made (no hit expected, but any hit must still be exact)
    life(cache, rng, layers, bs, prompt, 8, every, lambda s, k: np.maximum(fixed * s // 256, 1), sinks, recent)


def test_an_integer_budget_life_is_planned_once_per_shape():
    cache = PlanCache()
    rng = np.random.default_rng(0)
    life(cache, rng, 16, 16, 1024, 40, 128, lambda s, k: np.full(16, 1024), 4, 64, jitter=False)
    # at 1024 nothing to free (None), at 1152 the first eviction, at 1280 the first from a compressed
    # layout; from then on the layout each eviction leaves is its own start, moved on: all hits
    assert (cache.misses, cache.hits) == (3, 37)


def test_a_layout_without_a_hole_is_another_shape():
    # K == B (no stale rows) re-homes nothing; the same pages with B > K re-home rows B..: not one shape
    homes = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    no_hole, hole = (RequestLayout(4, np.array([2, 2]), 2, tail, homes) for tail in (2, 5))
    cache = PlanCache()
    for layout in (no_hole, hole):
        seq_len = (layout.tail_block + 6) * 4 + 1
        assert_same_plan(cache.plan(layout, [20, 20], seq_len), plan_reeviction(layout, [20, 20], seq_len))
    assert cache.misses == 2


def test_the_oldest_shape_is_dropped_beyond_size():
    cache = PlanCache(size=2)
    layout = RequestLayout.uncompressed(2, 4)
    for seq_len in (40, 44, 48):  # three shapes (t - B differs)
        cache.plan(layout, [8, 8], seq_len)
    cache.plan(layout, [8, 8], 48)
    assert (cache.misses, cache.hits) == (3, 1)
    cache.plan(layout, [8, 8], 40)  # dropped: made again
    assert cache.misses == 4


def test_none_is_cached_too():
    cache = PlanCache()
    layout = RequestLayout.uncompressed(2, 4)
    assert cache.plan(layout, [100, 100], 40) is None  # nothing to free
    assert cache.plan(layout, [100, 100], 40) is None and cache.hits == 1


def test_with_tail_shares_only_tail_free_arrays():
    plan = plan_reeviction(RequestLayout.uncompressed(3, 4), [6, 9, 13], 40)
    after = plan.precompute().after
    moved = with_tail(after, after.tail_block + 5)
    assert moved.entry_array is after.entry_array and moved.entry_offsets is after.entry_offsets
    np.testing.assert_array_equal(moved.shift_pages, after.shift_pages + 5)
    assert moved == RequestLayout(4, after.compact_pages, after.kept_blocks, after.tail_block + 5, after.homes)


def test_with_tail_refuses_a_tail_before_the_kept_rows_or_pages():
    layout = RequestLayout(4, np.array([3, 1]), 2, 6, np.array([[0, 0], [1, 0], [0, 1], [1, 1]]))
    assert with_tail(layout, 3).tail_block == 3
    for tail in (2, 1):  # below c_0 = 3, below K = 2
        with pytest.raises(ValueError):
            with_tail(layout, tail)


def test_the_planner_caches_integer_budgets_only():
    from types import SimpleNamespace

    from vllm_kvcomp.config import build_config
    from vllm_kvcomp.engine.decode_planning import DecodePlanner
    from vllm_kvcomp.engine.requests import DecodeState, TrackedRequest

    for budget, used in (("1024", True), ("0.2", False)):
        config = build_config(method="uniform", budget=budget, overrides={"evict_every": 128, "metrics_port": None})
        planner = DecodePlanner(SimpleNamespace(config=config), max_reqs=4)
        assert planner.cache.size == 8
        req = TrackedRequest("r", 0, [], 2000, True)
        req.decode = DecodeState.after_prefill(None, None, 0, 2000, 16, 16)
        first, again = planner.plan(req, 6000), planner.plan(req, 6000)
        assert_same_plan(again, first)
        assert (planner.cache.hits, planner.cache.misses) == ((1, 1) if used else (0, 0))

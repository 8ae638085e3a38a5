"""The block plan: survivors fit, nothing overlaps, freed blocks hold nothing live."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcomp.engine.layout import cdiv, layer_page_table_reference, page_id, plan_eviction


def test_hand_checked_plan():
    # P = 100 tokens, bs = 16: 6 full blocks + 4 tokens. Budgets -> c = ceil((B-4)/16).
    plan = plan_eviction(np.array([36, 20, 100, 20]), prompt_len=100, block_size=16)
    assert plan.compact_pages.tolist() == [2, 1, 6, 1]
    assert plan.kept_tokens.tolist() == [36, 20, 100, 20]
    assert plan.kept_blocks == 3  # ceil(10 / 4)
    assert list(plan.freed_block_indices) == [3, 4, 5]
    assert plan.shift_pages.tolist() == [4, 5, 0, 5]
    # Layer 2 keeps everything: its pages 3..5 move into free slots of blocks < 3.
    assert [r[:2] for r in plan.relocations] == [(2, 3), (2, 4), (2, 5)]
    assert [r[2:] for r in plan.relocations] == [(2, 0), (1, 1), (2, 1)]


def test_nothing_to_free_returns_none():
    assert plan_eviction(np.array([100, 100]), prompt_len=100, block_size=16) is None
    assert plan_eviction(np.array([10, 10]), prompt_len=10, block_size=16) is None


@st.composite
def plans(draw):
    bs = draw(st.sampled_from([16, 32]))
    num_layers = draw(st.integers(1, 12))
    prompt_len = draw(st.integers(bs, 40 * bs))
    budgets = draw(st.lists(st.integers(0, prompt_len), min_size=num_layers, max_size=num_layers))
    return plan_eviction(np.array(budgets), prompt_len, bs), budgets, prompt_len, bs


@settings(max_examples=400, deadline=None)
@given(plans())
def test_plan_invariants(case):
    plan, budgets, prompt_len, bs = case
    if plan is None:
        return
    L = plan.num_layers
    # every layer keeps at least its budget (rounded up to whole pages), at most the prompt
    assert np.all(plan.kept_tokens >= np.minimum(budgets, prompt_len))
    assert np.all(plan.kept_tokens <= prompt_len)
    # retained blocks are enough, and something is freed
    assert plan.kept_blocks * L >= plan.compact_pages.sum()
    assert plan.kept_blocks < plan.full_blocks
    # every compacted page has exactly one home, inside the retained blocks
    homes = [plan.page_location(l, j) for l in range(L) for j in range(plan.compact_pages[l])]
    assert len(set(homes)) == len(homes)
    assert all(0 <= i < plan.kept_blocks and 0 <= s < L for i, s in homes)
    # relocation targets were free after in-place compaction, sources get freed
    for _layer, j, i, s in plan.relocations:
        assert j >= plan.kept_blocks and i >= plan.compact_pages[s]
    # the entry table fits in the retained blocks and has one entry per page
    entries = plan.entries()
    assert len(entries) == plan.compact_pages.sum()
    assert all(eb < plan.kept_blocks for eb, _, _, _ in entries)
    assert len({(eb, es) for eb, es, _, _ in entries}) == len(entries)


def test_reference_page_table_after_decode():
    bs, N = 16, 1000
    plan = plan_eviction(np.array([36, 20, 100, 20]), prompt_len=100, block_size=16)
    row = [50 + 3 * i for i in range(9)]  # blocks of positions 0..143 (decoded up to 130)
    seq_len = 131
    for layer in range(4):
        pages, live = layer_page_table_reference(row, seq_len, layer, plan, N, bs)
        assert live == seq_len - plan.shift_pages[layer] * bs
        assert len(pages) == cdiv(live, bs)
        c = plan.compact_pages[layer]
        for j, page in enumerate(pages):
            if j >= c:  # stock pages of the boundary block and the decode blocks
                assert page == page_id(row[j + plan.shift_pages[layer]], layer, N)
        # compacted pages never point into freed blocks
        freed = {row[i] for i in plan.freed_block_indices}
        assert not any(p % N in freed for p in pages)

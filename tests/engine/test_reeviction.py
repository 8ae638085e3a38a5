"""Decode-time re-eviction (engine/reeviction.py) on a toy KV pool.

`ToyRequest` plays a request's life on a pool of token positions
[L * N pages, block_size, KV heads]: prefill and decode write position p at
`row[p // bs]` (vLLM's slot mapping), an eviction compacts every layer and head
in place with random keep indices (sinks and recent forced, as the executor
does), poisons what is dead, applies the plan's copies, re-homes, frees (a freed
block is scribbled on, as another request would) and publishes an entry table
read the way the page-table kernel reads it. After every step each layer and
head must read exactly the tokens it kept, in order, then every later token.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcomp.engine.layout import cdiv, layer_page_table_reference, plan_eviction
from vllm_kvcomp.engine.reeviction import (
    RequestLayout,
    compact_pages_for,
    layout_page_table_reference,
    plan_reeviction,
)

DEAD, FREED = -3, -2  # pool contents: dead after compaction; freed and reused by someone else


class ToyRequest:
    def __init__(self, rng, num_layers, num_heads, block_size, max_len, sinks=0, recent=1):
        self.rng, self.L, self.H, self.bs = rng, num_layers, num_heads, block_size
        self.N = cdiv(max_len, block_size) + 3
        self.sinks, self.recent = sinks, recent
        self.pool = np.full((num_layers * self.N, block_size, num_heads), -1, dtype=np.int64)
        self.entries = np.full(num_layers * self.N, -1, dtype=np.int64)
        self.free = list(range(self.N))
        self.row: list[int] = []
        self.held: Counter[int] = Counter()  # the scheduler's multiset of held block ids
        self.layout = RequestLayout.uncompressed(num_layers, block_size)
        self.seq_len = self.evicted = 0
        self.expected = [[[] for _ in range(num_heads)] for _ in range(num_layers)]
        self.plans: list = []

    def grow(self, n: int) -> None:
        """Prefill or decode n tokens: new blocks appended to the row, positions written for every layer."""
        new_len = self.seq_len + n
        while len(self.row) < cdiv(new_len, self.bs):
            block = self.free.pop(int(self.rng.integers(len(self.free))))  # freed ids come back here
            self.row.append(block)
            self.held[block] += 1
        pos = np.arange(self.seq_len, new_len)
        blocks = np.asarray(self.row, dtype=np.int64)[pos // self.bs]
        for layer in range(self.L):
            self.pool[layer * self.N + blocks, pos % self.bs, :] = pos[:, None]
            for head in range(self.H):
                self.expected[layer][head].extend(pos.tolist())
        self.seq_len = new_len
        self.check_reads()

    def pages(self, layer: int) -> list[int]:
        """The reference page table, equal to the kernel's read through the published entry table."""
        pages, live = layout_page_table_reference(self.row, self.seq_len, layer, self.layout, self.N)
        c, first = int(self.layout.compact_pages[layer]), int(self.layout.entry_offsets[layer])
        shift = int(self.layout.shift_pages[layer])
        via_entries = []
        for j in range(cdiv(live, self.bs)):
            q = first + j
            entry_at = (q % self.L) * self.N + self.row[q // self.L]
            stock = layer * self.N + self.row[j + shift]
            via_entries.append(int(self.entries[entry_at]) if j < c else stock)
        assert via_entries == pages
        return pages

    def tokens(self, layer: int) -> np.ndarray:
        """[H, live] token positions that attention reads for `layer`."""
        live = int(self.layout.live_tokens(self.seq_len)[layer])
        return self.pool[self.pages(layer)].transpose(2, 0, 1).reshape(self.H, -1)[:, :live]

    def check_reads(self) -> None:
        tables = [self.pages(layer) for layer in range(self.L)]
        every = [p for table in tables for p in table]
        assert len(set(every)) == len(every), "two layers (or two logical pages) share a page"
        for layer in range(self.L):
            assert self.tokens(layer).tolist() == self.expected[layer]
        held_ids = [self.row[p] for p in self.layout.held_positions(self.seq_len)]
        assert Counter(held_ids) == +self.held and max(self.held.values(), default=0) <= 1
        assert set(every) <= {s * self.N + b for s in range(self.L) for b in held_ids}, "a read outside held rows"
        assert sum(self.held.values()) == cdiv(self.seq_len, self.bs) - self.evicted

    def evict(self, budgets) -> object | None:
        S, before = self.seq_len, self.layout
        plan = plan_reeviction(before, budgets, S, self.sinks, self.recent)
        if plan is None:  # nothing to free: even the new c' would need every held block
            need = cdiv(int(compact_pages_for(before, budgets, S, self.sinks, self.recent).sum()), self.L)
            assert need + cdiv(S, self.bs) - S // self.bs >= sum(self.held.values())
            return None
        self.check_plan(plan, budgets)
        old_tables = [self.pages(layer) for layer in range(self.L)]
        keep = [[self.choose_keep(plan, layer, head) for head in range(self.H)] for layer in range(self.L)]
        for layer in range(self.L):
            self.compact(old_tables[layer][: plan.domain_pages[layer]], keep[layer])
        self.poison_dead(plan, old_tables, before)
        self.relocate_and_free(plan, before)
        self.layout = plan.after
        ent = plan.entry_array  # published as LayerPageState.publish does, with the re-homed row
        row = np.asarray(self.row, dtype=np.int64)
        self.entries[ent[:, 1] * self.N + row[ent[:, 0]]] = ent[:, 3] * self.N + row[ent[:, 2]]
        for layer in range(self.L):
            domain = plan.domain_pages[layer] * self.bs
            for head, kept in enumerate(keep[layer]):
                old = self.expected[layer][head]
                self.expected[layer][head] = [old[k] for k in kept] + old[domain:]
        self.plans.append(plan)
        self.check_reads()
        self.check_protected(plan)
        return plan

    def check_plan(self, plan, budgets) -> None:
        # budget + slack: whole pages (bs - 1); the floor is the protected tokens (and a boundary
        # block fuller than num_recent, where the sinks still need their own page)
        rem = plan.boundary_tokens
        floored = np.maximum(np.asarray(budgets), self.sinks + max(self.recent, rem))
        live_before = plan.before.live_tokens(self.seq_len)
        assert plan.kept_blocks == cdiv(int(plan.compact_pages.sum()), self.L)
        assert np.all(plan.kept_tokens >= np.minimum(floored, live_before)), "a layer keeps less than its budget"
        assert np.all(plan.kept_tokens <= np.maximum(floored, rem) + self.bs - 1)
        assert np.all(plan.compact_pages <= plan.domain_pages)
        assert np.all(plan.shift_pages == self.seq_len // self.bs - plan.compact_pages)
        assert np.all(plan.entry_array[:, 0] < plan.kept_blocks), "an entry outside the retained rows"

    def choose_keep(self, plan, layer: int, head: int) -> np.ndarray:
        """Random ascending keep indices over the domain, sinks and the recent window forced."""
        live = len(self.expected[layer][head])
        domain, count = plan.domain_pages[layer] * self.bs, plan.compact_pages[layer] * self.bs
        logical = np.arange(domain)
        forced = (logical < self.sinks) | (logical >= live - self.recent)
        assert forced.sum() <= count, "the protected tokens do not fit"
        rest = self.rng.choice(np.flatnonzero(~forced), size=count - forced.sum(), replace=False)
        return np.sort(np.concatenate([np.flatnonzero(forced), rest])).astype(np.int64)

    def compact(self, domain_pages: list[int], keep: list[np.ndarray]) -> None:
        """In place, per head, as compact_kv_: kept token k goes to logical slot k of the same pages."""
        pages = np.asarray(domain_pages, dtype=np.int64)
        for head, kept in enumerate(keep):
            flat = self.pool[pages, :, head].reshape(-1)
            slot = np.arange(len(kept))
            self.pool[pages[slot // self.bs], slot % self.bs, head] = flat[kept]

    def poison_dead(self, plan, old_tables, before) -> None:
        """Everything of the request but each layer's first c'_l pages and its tail is now dead."""
        live = set()
        for layer, table in enumerate(old_tables):
            live |= set(table[: plan.compact_pages[layer]]) | set(table[plan.domain_pages[layer] :])
        held = [self.row[p] for p in before.held_positions(self.seq_len)]
        dead = sorted({s * self.N + b for s in range(self.L) for b in held} - live)
        self.pool[dead] = DEAD

    def relocate_and_free(self, plan, before) -> None:
        K_new, t, old_row = plan.kept_blocks, plan.tail_block, self.row
        src, dst = plan.page_copies(old_row, self.N)
        freed, rehomed = plan.freed_ids(old_row), plan.rehomed_ids(old_row)
        new_row = plan.new_row(old_row)
        # freed = the held rows K'..t-1 minus the re-homed ids; nothing both freed and kept
        held_before = set(before.held_positions(self.seq_len).tolist())
        in_hole = {old_row[p] for p in range(K_new, t) if p in held_before}
        assert len(set(freed)) == len(freed) and set(freed) == in_hole - set(rehomed)
        assert set(rehomed) <= {old_row[p] for p in range(before.tail_block, t)}
        kept_ids = set(new_row[:K_new]) | set(old_row[t:])
        assert not set(freed) & kept_ids
        # one batched copy: unique destinations, dead before, in retained rows; sources only in freed rows
        assert len(set(dst.tolist())) == len(dst) and not set(src.tolist()) & set(dst.tolist())
        assert np.all(self.pool[dst] == DEAD), "a copy overwrites live data"
        assert {int(p) % self.N for p in src} <= set(freed)
        assert {int(p) % self.N for p in dst} <= set(new_row[:K_new])
        self.pool[dst] = self.pool[src]
        self.row = new_row
        for block in freed:
            self.held[block] -= 1
            self.pool[np.arange(self.L) * self.N + block] = FREED
            self.free.append(block)
        self.evicted += len(freed)

    def check_protected(self, plan) -> None:
        """Sinks and the last `recent` positions survive every eviction; each list is ascending."""
        S = self.seq_len
        for layer in range(self.L):
            for tokens in self.tokens(layer).tolist():
                assert len(tokens) == plan.kept_tokens[layer] and tokens == sorted(set(tokens))
                assert tokens[: min(self.sinks, S)] == list(range(min(self.sinks, S)))
                assert tokens[len(tokens) - min(self.recent, S) :] == list(range(S - min(self.recent, S), S))


def budgets_for(kind: str, weights, amount: float, seq_len: int) -> np.ndarray:
    """Per-layer budgets at context seq_len: a fraction of it (grows with it), an absolute count, or all."""
    weights = np.asarray(weights, dtype=np.float64)
    if kind == "whole":
        return np.full(len(weights), seq_len, dtype=np.int64)
    scale = amount * seq_len if kind == "fraction" else amount
    return np.ceil(weights * scale).astype(np.int64)


def run_stream(seed, num_layers, num_heads, bs, prompt, rounds, sinks=0, recent=1) -> ToyRequest:
    """Prefill, then per round (n, kind, weights, amount): decode n tokens and evict; checks at every step."""
    max_len = prompt + sum(n for n, *_ in rounds) + 5
    req = ToyRequest(np.random.default_rng(seed), num_layers, num_heads, bs, max_len, sinks, recent)
    req.grow(prompt)
    for n, kind, weights, amount in rounds:
        req.grow(n)
        req.evict(budgets_for(kind, weights, amount, req.seq_len))
    return req


KINDS = st.sampled_from(["fraction", "fraction", "absolute", "whole"])


@st.composite
def streams(draw):
    num_layers = draw(st.integers(1, 6))
    weights = st.lists(st.floats(0, 1.5), min_size=num_layers, max_size=num_layers)
    round_ = st.tuples(st.integers(0, 90), KINDS, weights, st.floats(0, 1))
    rounds = draw(st.lists(round_, min_size=1, max_size=4))
    rounds = [(n, kind, w, amount * 300 if kind == "absolute" else amount) for n, kind, w, amount in rounds]
    return dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        num_layers=num_layers,
        num_heads=draw(st.integers(1, 2)),
        bs=draw(st.sampled_from([1, 4, 16])),
        prompt=draw(st.integers(0, 300)),
        rounds=rounds,
        sinks=draw(st.integers(0, 4)),
        recent=draw(st.integers(1, 20)),
    )


@settings(max_examples=400, deadline=None)
@given(streams())
def test_repeated_evictions_read_exactly_the_kept_tokens(stream):
    req = run_stream(**stream)
    req.grow(5)  # decode after the last eviction still lands where attention reads it


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([1, 4, 16]),
    st.integers(1, 8),
    st.integers(0, 400),
    st.lists(st.integers(0, 400), min_size=8, max_size=8),
)
def test_from_an_uncompressed_request_it_is_plan_eviction(bs, num_layers, prompt_len, budgets):
    budgets = np.array(budgets[:num_layers])
    first = plan_eviction(budgets, prompt_len, bs)
    again = plan_reeviction(RequestLayout.uncompressed(num_layers, bs), budgets, prompt_len)
    assert (first is None) == (again is None)
    if first is None or again is None:
        return
    assert again.compact_pages.tolist() == first.compact_pages.tolist()
    assert again.kept_blocks == first.kept_blocks and len(again.rehome_sources) == 0
    assert again.freed_positions.tolist() == list(first.freed_block_indices)
    expected = [(i, s, j) for _, j, i, s in first.relocations]  # plan_eviction's page j sits in row j, own slot
    assert [(i, s, p) for p, _, i, s in again.relocation_array.tolist()] == expected
    assert again.entry_array.tolist() == first.entry_array.tolist()
    after = RequestLayout.from_plan(first)
    assert after.homes.tolist() == again.after.homes.tolist() and after.tail_block == again.tail_block
    row = list(range(100, 100 + cdiv(prompt_len + 40, bs)))
    for layer in range(num_layers):  # the generalised reference agrees with layout.py's
        seq_len = prompt_len + 37
        reference = layer_page_table_reference(row, seq_len, layer, first, 1000, bs)
        assert layout_page_table_reference(row, seq_len, layer, after, 1000) == reference


def hand_layout() -> tuple[RequestLayout, list[int]]:
    # test_layout's hand-checked prefill: P = 100, bs = 16, c = [2, 1, 6, 1], K = 3, B = 6;
    # layer 2's pages 3, 4, 5 live at (row 2, slot 0), (1, 1), (2, 1).
    layout = RequestLayout.from_plan(plan_eviction(np.array([36, 20, 100, 20]), prompt_len=100, block_size=16))
    return layout, [50 + 3 * i for i in range(10)]


def test_hand_checked_same_budgets_free_the_decoded_blocks():
    layout, row = hand_layout()
    plan = plan_reeviction(layout, np.array([36, 20, 100, 20]), seq_len=150)  # t = 9, rem = 6
    assert plan.domain_pages.tolist() == [5, 4, 9, 4]
    assert plan.compact_pages.tolist() == [2, 1, 6, 1] and plan.kept_blocks == 3
    assert plan.shift_pages.tolist() == [7, 8, 3, 8] and plan.kept_tokens.tolist() == [38, 22, 102, 22]
    assert len(plan.relocation_array) == 0 and len(plan.rehome_sources) == 0  # every kept page already home
    assert plan.freed_ids(row) == [row[6], row[7], row[8]]


def test_hand_checked_grown_budgets_rehome_one_row():
    layout, row = hand_layout()
    plan = plan_reeviction(layout, np.full(4, 60), seq_len=150)  # c' = ceil(54 / 16) = 4: K' = 4
    assert plan.compact_pages.tolist() == [4, 4, 4, 4] and plan.kept_blocks == 4
    assert plan.rehomed_ids(row) == [row[6]] and plan.new_row(row)[:4] == [row[0], row[1], row[2], row[6]]
    assert plan.freed_ids(row) == [row[7], row[8]]
    ids = np.asarray(row, dtype=np.int64)  # the evictor's form: the array in, the array out, the input kept
    rewritten = plan.rewritten_row(ids)
    assert rewritten.dtype == np.int64 and rewritten.tolist() == plan.new_row(row) and ids.tolist() == list(row)
    assert plan.rehomed_ids(ids) == plan.rehomed_ids(row) and plan.freed_ids(ids) == plan.freed_ids(row)
    # stay: row 6's pages (now position 3); move: the kept pages of rows 7, 8 into dead slots
    # (layer 2's dropped pages 4, 5 at (1, 1), (2, 1); free slots slot-major).
    assert plan.relocation_array.tolist() == [
        [7, 0, 1, 1],
        [7, 1, 2, 1],
        [8, 1, 3, 2],
        [7, 3, 1, 3],
        [8, 3, 2, 3],
    ]


def test_context_that_shrank_or_wrong_budget_count_is_refused():
    layout, _ = hand_layout()
    with pytest.raises(ValueError, match="tail block"):
        plan_reeviction(layout, np.full(4, 10), seq_len=80)
    with pytest.raises(ValueError, match="budgets for 4 layers"):
        plan_reeviction(layout, np.full(3, 10), seq_len=150)
    with pytest.raises(ValueError, match="do not fit in 1 rows"):
        RequestLayout(16, np.array([2]), 1, 6, np.array([[0, 0], [1, 0]]))
    with pytest.raises(ValueError, match="rows 0..K-1"):
        RequestLayout(16, np.array([2]), 2, 6, np.array([[0, 0], [2, 0]]))
    with pytest.raises(ValueError, match="share one page"):
        RequestLayout(16, np.array([1, 1]), 1, 6, np.array([[0, 0], [0, 0]]))


def test_budgets_of_the_whole_context_evict_nothing():
    req = run_stream(0, 3, 2, 16, 160, [(0, "whole", [1, 1, 1], 0), (48, "whole", [1, 1, 1], 0)])
    assert req.plans == [] and req.evicted == 0  # rem = 0 at 160 and 208: still nothing to free
    layout, _ = hand_layout()
    assert plan_reeviction(layout, np.full(4, 150), seq_len=150) is None
    # a compressed request: None leaves its layout, which later decodes and evictions build on
    rounds = [(0, "fraction", [1, 1], 0.25), (40, "whole", [1, 1], 0), (40, "fraction", [1, 1], 0.25)]
    req = run_stream(4, 2, 1, 16, 130, rounds, sinks=4, recent=16)
    assert len(req.plans) == 2 and req.plans[1].before is req.plans[0].after


@pytest.mark.parametrize("bs", [1, 16])
def test_shrinking_budgets_free_retained_rows(bs):
    req = run_stream(
        1, 4, 2, bs, 20 * bs, [(0, "absolute", [1.0] * 4, 12 * bs), (2 * bs, "absolute", [1.0] * 4, 3 * bs)]
    )
    first, second = req.plans
    assert second.kept_blocks < first.kept_blocks  # K' < K: rows K'..K-1 freed, their kept pages moved
    assert set(range(second.kept_blocks, first.kept_blocks)) <= set(second.freed_positions.tolist())


def test_grown_budget_rehomes_past_the_hole():
    # L = 1, bs = 4: prefill 10 keeps 1 page (K = 1, B = 2); at 42 a budget of 30 needs 7 pages:
    # K' = 7 > B, so the re-homed positions 1..6 overlap their sources 2..7.
    req = run_stream(2, 1, 2, 4, 10, [(0, "absolute", [1.0], 4), (32, "absolute", [1.0], 30)])
    plan = req.plans[1]
    assert (plan.before.kept_blocks, plan.before.tail_block, plan.kept_blocks) == (1, 2, 7)
    assert plan.rehome_sources.tolist() == [2, 3, 4, 5, 6, 7] and plan.freed_positions.tolist() == [8, 9]


@pytest.mark.parametrize(("bs", "num_layers", "boundary"), [(1, 5, 0), (16, 5, 0), (16, 5, 5), (16, 1, 9)])
def test_many_decode_evictions_with_a_fraction_budget(bs, num_layers, boundary):
    # every 2 blocks (rem stays `boundary`), a budget of 0.3 of the growing context, one per-layer shape
    weights = [0.4, 1.3, 0.9, 1.4, 1.0][:num_layers]
    rounds = [(0, "fraction", weights, 0.3)] + [(2 * bs, "fraction", weights, 0.3)] * 6
    req = run_stream(3, num_layers, 2, bs, 12 * bs + boundary, rounds, sinks=2, recent=bs + 3)
    assert len(req.plans) == 7 and all(p.seq_len % bs == boundary for p in req.plans)
    assert any(len(p.rehome_sources) for p in req.plans)  # the budget grew: K' > K
    if num_layers > 1:
        assert any(len(p.relocation_array) for p in req.plans[1:])

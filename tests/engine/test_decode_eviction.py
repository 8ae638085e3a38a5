"""Decode-time eviction (engine/decode_eviction.py) through the runtime's step hooks, on CPU.

`Life` plays the worker around the runtime as vLLM 0.25.1's V2 runner does: a
persistent block-table row per request slot (the scheduler appends block ids at
the row's end, the runner stages the re-homed ids before the next step), every
token's K/V written through the stock slot mapping (`row[pos // bs]`), the
prompt window captured in the prefill step, then one decode token per request
per step: `begin_step` (ring plan), the page tables attention reads
(`layer_tables`), the ring write of each layer's query and its exact LSE,
`end_step`. A freed block goes back to the free list and is scribbled on at once
(as if another request got it).

Every value vector carries (position, request, layer), so each step reads every
layer of every request back through its page tables and checks it holds exactly
its kept tokens in order, then the tail, with their own keys and values; each
eviction must keep the sinks and recent tokens, the top tokens of the reference
scorer, and stay within budget + slack (docs/LIFETIME-BUDGETS.md, section 1).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from runtime_helpers import FailAt, make_batch
from vllm_kvcomp.kernels.reference import window_lse_reference, window_scores_reference

from vllm_kvcomp.config import build_config, request_config
from vllm_kvcomp.engine.decode_eviction import MAX_DEFERRED
from vllm_kvcomp.engine.decode_planning import decode_budgets, logical_page_table, logical_pages
from vllm_kvcomp.engine.executor import compaction_rows
from vllm_kvcomp.engine.layout import cdiv, plan_eviction
from vllm_kvcomp.engine.reeviction import RequestLayout, layout_page_table_reference, plan_reeviction
from vllm_kvcomp.engine.runtime import CompressionRuntime

L, HKV, G, D, BS, N, WIDTH, MAX_REQS = 3, 2, 2, 32, 16, 64, 32, 6
HQ, SCALE = HKV * G, D**-0.5
EVERY, WDEC, SINKS, RECENT = 32, 4, 2, 16


def make_runtime(method="uniform", budget="0.3", **overrides):
    options = dict(window=8, num_recent=RECENT, num_sinks=SINKS, pool_kernel=3, max_pending_requests=4)
    options.update(metrics_port=None, evict_every=EVERY, decode_window=WDEC)
    options.update(overrides)
    runtime = CompressionRuntime(build_config(method=method, budget=budget, overrides=options), vllm_config=None)
    pool = torch.randn(L * N, 2, BS, HKV, D).to(torch.bfloat16)
    runtime.setup(
        layer_names=[f"model.layers.{i}.attn" for i in range(L)], pool=pool, blocks_per_layer=N, block_size=BS,
        num_heads=HQ, scale=SCALE, max_reqs=MAX_REQS, width=WIDTH,
    )  # fmt: skip
    return runtime, pool


class StagedRows:
    """vLLM's `StagedWriteTensor` of the block table, applied at once (the runner applies staged
    writes before it builds the next step's block tables and slot mappings)."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def stage_write(self, index: int, start: int, ids: list[int]) -> None:
        self.table[index, start : start + len(ids)] = torch.tensor(ids, dtype=torch.int32)


class Life:
    """The runner, the scheduler's block accounting and the model's KV writes around one runtime."""

    def __init__(self, runtime, pool, seed=0):
        from vllm_kvcomp.engine.worker import CompressionModelRunner

        self.rt, self.pool, self.g = runtime, pool, torch.Generator().manual_seed(seed)
        self.free = [int(b) for b in np.random.default_rng(seed).permutation(np.arange(1, N))]  # 0: vLLM's null
        self.table = torch.zeros(MAX_REQS + 1, WIDTH, dtype=torch.int32)  # vLLM's rows, by runner index
        self.runner = object.__new__(CompressionModelRunner)
        self.runner.kvcomp = runtime
        self.runner.block_tables = SimpleNamespace(blocks_per_kv_block=[1], block_tables=[StagedRows(self.table)])
        self.state: dict[str, dict] = {}  # per request: index, seq_len, held ids, evicted count, number
        self.kv: dict[tuple[str, int, int], torch.Tensor] = {}  # (request, layer, position) -> [2, Hkv, D]
        self.expected: dict[tuple[str, int], list[list[int]]] = {}  # (request, layer) -> positions per head
        self.pending: dict[str, object] = {}  # evicted last step: the next read shows what it kept
        self.records: list = []
        self.queries: dict[tuple[str, int], list[torch.Tensor]] = {}  # the last decode queries
        self.keys: dict[tuple[str, int], torch.Tensor] = {}  # each layer's logical keys this step

    # ------------------------------------------------------------ model side
    def token(self, req_id, layer, pos) -> torch.Tensor:
        kv = torch.randn(2, HKV, D, generator=self.g)
        kv[1, :, :3] = torch.tensor([pos // 64, pos % 64, 100 + 10 * self.state[req_id]["number"] + layer])
        self.kv[(req_id, layer, pos)] = kv.to(torch.bfloat16)
        return self.kv[(req_id, layer, pos)]

    def write(self, req_id, positions) -> None:
        """The stock slot mapping: position p of layer l at page l * N + row[p // bs], slot p % bs."""
        index = self.state[req_id]["index"]
        for pos in positions:
            block = int(self.table[index, pos // BS])
            for layer in range(L):
                self.pool[layer * N + block, :, pos % BS] = self.token(req_id, layer, pos)

    def allocate(self, req_id, length) -> list[int]:
        """The scheduler's new blocks for `length` tokens, appended to the row (`append_block_ids`)."""
        s, new = self.state[req_id], []
        while s["num_blocks"] < cdiv(length, BS):  # the row keeps freed ids' positions: cdiv(tokens) long
            block = self.free.pop(0)
            self.table[s["index"], s["num_blocks"]] = block
            s["num_blocks"] += 1
            s["held"].append(block)
            new.append(block)
        return new

    # ----------------------------------------------------------------- steps
    def prefill(self, prompts: dict[str, tuple[int, object]]):
        rows = []
        for req_id, (prompt, config) in prompts.items():
            index = len(self.state) + 1
            self.state[req_id] = dict(index=index, seq_len=prompt, held=[], evicted=0, num_blocks=0, number=index)
            blocks = self.allocate(req_id, prompt)
            self.rt.add_request(req_id, index=index, block_ids=blocks, prompt_len=prompt, config=config)
            self.write(req_id, range(prompt))
            for layer in range(L):
                self.expected[(req_id, layer)] = [list(range(prompt)) for _ in range(HKV)]
            rows.append((req_id, index, 0, prompt, True))
        self.rt.begin_step(make_batch(rows))
        plan, tokens = self.rt.step_capture, sum(r[3] for r in rows)
        for layer in range(L):  # the prompt windows (random: only the prefill's own tests check scores)
            query = torch.randn(tokens, HQ, D, generator=self.g).to(torch.bfloat16)
            if plan is not None:
                self.rt.capture(layer, query, torch.randn(HQ, tokens, generator=self.g) + 5.0, plan)
        return self.finish(self.rt.end_step())

    def decode(self, before_end=None):
        """One decode token for every request; returns the step's report."""
        ids = list(self.state)
        for req_id in ids:
            s = self.state[req_id]
            self.rt.append_blocks(req_id, self.allocate(req_id, s["seq_len"] + 1))
        self.runner.write_rehomed_rows()  # the runner's update_requests
        for req_id in ids:
            self.write(req_id, [self.state[req_id]["seq_len"]])
            for layer in range(L):
                for head in self.expected[(req_id, layer)]:
                    head.append(self.state[req_id]["seq_len"])
        rows = [(r, self.state[r]["index"], self.state[r]["seq_len"], 1, False) for r in ids]
        batch = make_batch(rows)
        self.rt.begin_step(batch)
        index = batch.idx_mapping.long()
        seq_lens = torch.tensor([self.state[r]["seq_len"] + 1 for r in ids], dtype=torch.int32)
        tables, lens = self.rt.layer_tables(self.table[index], seq_lens)
        self.check_reads(ids, tables, lens)
        self.record_queries(ids)
        for req_id in ids:
            self.state[req_id]["seq_len"] += 1
        if before_end is not None:
            before_end()
        return self.finish(self.rt.end_step())

    def record_queries(self, ids) -> None:
        """What attention hands the ring per layer: each token's query and its LSE over the layer's keys."""
        for layer in range(L):
            query = torch.randn(len(ids), HQ, D, generator=self.g).to(torch.bfloat16)
            lse = torch.stack([window_lse_reference(query[r : r + 1], self.keys[(i, layer)], scale=SCALE)[0]
                               for r, i in enumerate(ids)], dim=1)  # fmt: skip
            if self.rt.decode_ring is not None:  # as the attention backend: only with evict_every
                self.rt.decode_ring.record(layer, query, lse)
            for r, req_id in enumerate(ids):
                self.queries.setdefault((req_id, layer), []).append(query[r])
                del self.queries[(req_id, layer)][:-WDEC]

    def finish(self, report):
        """The scheduler's side: freed ids leave the request and go back to the pool (scribbled on)."""
        if report is None:
            return None
        for record in report.evictions:
            s = self.state[record.req_id]
            freed = record.freed_block_ids
            assert len(set(freed)) == len(freed) and set(freed) <= set(s["held"]), "freed a block it does not hold"
            for block in freed:
                s["held"].remove(block)
                self.free.append(block)
                self.pool[torch.arange(L) * N + block] = torch.randn(L, 2, BS, HKV, D).to(torch.bfloat16)
            s["evicted"] += len(freed)
            # the window at the eviction: the keys read and the queries recorded this step
            window = {k: torch.stack(v) for k, v in self.queries.items() if k[0] == record.req_id}
            self.pending[record.req_id] = (record, s["seq_len"], dict(self.keys), window)
            self.records.append(record)
        return report

    # ---------------------------------------------------------------- checks
    def check_reads(self, ids, tables, lens) -> None:
        """Every layer of every request, read through the tables attention gets."""
        self.keys = {}
        for r, req_id in enumerate(ids):
            s, tracked = self.state[req_id], self.rt.requests[req_id]
            assert self.table[s["index"], : s["num_blocks"]].tolist() == tracked.block_ids[: s["num_blocks"]]
            assert len(s["held"]) == cdiv(s["seq_len"] + 1, BS) - s["evicted"]  # the scheduler's count
            held_pages = {slot * N + b for slot in range(L) for b in s["held"]}
            pending = self.pending.pop(req_id, None)
            for layer in range(L):
                live = int(lens[layer][r])
                pages = tables[layer][r, : cdiv(live, BS)].long()
                assert set(pages.tolist()) <= held_pages, "a page outside the blocks the request holds"
                read = self.pool[pages].transpose(0, 1).reshape(2, -1, HKV, D)[:, :live]
                self.keys[(req_id, layer)] = read[0]
                heads = [self.positions(req_id, layer, read, h) for h in range(HKV)]
                if pending is not None:
                    self.check_kept(req_id, layer, heads, *pending)
                assert heads == self.expected[(req_id, layer)]
            self.check_bounds(req_id, lens, r)

    def positions(self, req_id, layer, read, head) -> list[int]:
        values = read[1, :, head].float()
        assert (values[:, 2] == 100 + 10 * self.state[req_id]["number"] + layer).all(), "another token was read"
        positions = (values[:, 0] * 64 + values[:, 1]).long().tolist()
        for k, pos in enumerate(positions):  # keys and values moved together, bit-exact
            assert torch.equal(read[:, k, head], self.kv[(req_id, layer, pos)][:, head])
        return positions

    def check_kept(self, req_id, layer, heads, record, context, keys, windows) -> None:
        """The eviction at `context`: ascending subset, protected tokens, top-k of the reference scorer."""
        kept = record.kept_tokens[layer]
        old = self.expected[(req_id, layer)]
        rem = context % BS
        for head, now in enumerate(heads):
            before = old[head][:-1]  # without this step's token
            assert now[:-1] == sorted(set(now[:-1]) & set(before)) and len(now) - 1 == kept
            assert set(range(SINKS)) | set(before[-RECENT:]) <= set(now), "a sink or recent token was evicted"
            self.expected[(req_id, layer)][head] = now
            if record.phase == "prefill":  # random prompt windows: the prefill's own tests check its scores
                continue
            scores, _ = window_scores_reference(
                windows[(req_id, layer)],
                keys[(req_id, layer)],
                scale=SCALE,
                pool_kernel=3,
                pool_type="max",
                square=False,
            )
            logical = torch.tensor([before.index(p) for p in now[:-1]])
            chosen = torch.zeros(len(before), dtype=torch.bool)
            chosen[logical] = True
            free = torch.ones(len(before), dtype=torch.bool)
            free[:SINKS] = False
            free[len(before) - max(RECENT, rem) :] = False
            if (chosen & free).any() and (~chosen & free).any():
                top = scores[head]
                assert top[chosen & free].min() >= top[~chosen & free].max() - 2e-2 * top.max()
        assert kept >= min(len(old[0]) - 1, SINKS + RECENT)

    def check_bounds(self, req_id, lens, r) -> None:
        """Section 1: average kept <= B_avg + bs - 1 + evict_every; held <= ceil(B_avg/bs) + 2 + evict_every/bs."""
        s, tracked = self.state[req_id], self.rt.requests[req_id]
        if tracked.decode is not None and (tracked.decode.deferred or tracked.decode.stopped):
            return  # its last eviction failed: it grows until the next one succeeds
        config = tracked.config or self.rt.config
        every = config.evict_every  # the request's own cadence (kv_evict_every)
        if every is None or not config.evicts_while_decoding:
            return  # decode-time eviction off for it (or `none`): grows as stock vLLM's
        average = config.average_budget(s["seq_len"] + 1)
        live = np.array([int(lens[layer][r]) for layer in range(L)])
        assert live.mean() <= average + BS - 1 + every, (req_id, live, average)
        assert len(s["held"]) <= cdiv(average, BS) + 2 + every // BS, (req_id, len(s["held"]), average)

    def run(self, steps, **kwargs):
        reports = []
        for _ in range(steps):
            reports.append(self.decode(**kwargs))
        return reports


def test_a_requests_whole_life_with_repeated_decode_evictions(monkeypatch):
    runtime, pool = make_runtime("uniform", budget="0.3")
    server = runtime.config
    life = Life(runtime, pool, seed=1)
    chunks = []
    evict_chunk = runtime.decode_evictor._evict_chunk
    monkeypatch.setattr(runtime.decode_evictor, "_evict_chunk", lambda r, g: chunks.append(len(r)) or evict_chunk(r, g))
    prompts = {
        "a": (150, request_config(server, {"kv_compression": "pyramid"})),  # per-layer budgets that differ
        "b": (200, request_config(server, {"kv_budget": 96})),  # absolute: the same budget for life
        "c": (40, request_config(server, {"kv_budget": 64})),  # within budget: followed from its prompt on
    }
    report = life.prefill(prompts)
    assert [r.req_id for r in report.evictions] == ["a", "b"] and all(r.freed_block_ids for r in report.evictions)
    c = runtime.requests["c"]  # within budget: not compressed, followed with its stock layout and even ratios
    assert not c.compress and c.decode.layout.tail_block == 0 and c.decode.ratios.tolist() == [1.0] * L
    life.run(5 * EVERY + 3)
    decode = [r for r in life.records if r.phase == "decode"]
    # every EVERY tokens all three are due at once: one batch (c frees nothing the first time)
    assert chunks == [3] * 5
    by_req = {rid: [r for r in decode if r.req_id == rid] for rid in "abc"}
    assert [len(by_req[rid]) for rid in "abc"] == [5, 5, 4]
    assert [r.prompt_len for r in by_req["a"]] == [150 + EVERY * k for k in range(1, 6)]
    for record in decode:
        config = runtime.requests[record.req_id].config
        average = config.average_budget(record.prompt_len)
        assert record.freed_block_ids and np.mean(record.kept_tokens) <= average + BS - 1
        assert all(e >= 0 for e in record.evicted_tokens) and sum(record.evicted_tokens) > 0
    assert len({tuple(r.kept_tokens) for r in by_req["a"]}) > 1  # a fraction budget: grows with the context
    last = by_req["a"][-1].kept_tokens  # pyramid: the prefill's falling budgets still fall at decode time
    assert last == sorted(last, reverse=True) and last[0] > last[-1]
    assert by_req["b"][-1].kept_tokens == by_req["b"][0].kept_tokens  # 96 tokens at every context
    assert any(len(runtime.requests[r].block_ids) > len(set(runtime.requests[r].block_ids)) for r in "ab"), (
        "no eviction re-homed a row"
    )


def test_requests_evict_at_their_own_cadence():
    """kv_evict_every: twice the server's cadence, the server's, and off, in one engine."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    server = runtime.config
    life = Life(runtime, pool, seed=9)
    life.prefill({
        "a": (150, request_config(server, {"kv_evict_every": 2 * EVERY}, block_size=BS)),  # twice as slow
        "b": (150, None),  # the server's
        "c": (150, request_config(server, {"kv_evict_every": "off"}, block_size=BS)),
    })  # fmt: skip
    assert runtime.requests["c"].decode is None  # prefill-evicted, then not followed
    life.run(4 * EVERY + 1)  # every read is checked against what each eviction kept
    decode = {rid: [r.prompt_len for r in life.records if r.phase == "decode" and r.req_id == rid] for rid in "abc"}
    assert decode == {"a": [150 + 2 * EVERY * k for k in (1, 2)], "b": [150 + EVERY * k for k in (1, 2, 3, 4)], "c": []}
    assert [r.req_id for r in life.records if r.phase == "prefill"] == ["a", "b", "c"]
    assert [runtime.decode_ring.slot_of(rid) is not None for rid in "abc"] == [True, True, False]


def test_requests_that_can_never_be_evicted_hold_no_ring_slot_and_no_decode_state():
    """Budget 1.0 keeps the whole context at every step and `none` compresses nothing: neither gets a
    decode-ring slot (its decode tokens write the scratch row) nor a decode state planned every
    `evict_every` tokens, so a batch of them costs the ring's host planning nothing."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    server = runtime.config
    life = Life(runtime, pool, seed=4)
    life.prefill({
        "full": (150, request_config(server, {"kv_budget": 1.0}, block_size=BS)),
        "none": (150, request_config(server, {"kv_compression": "none"}, block_size=BS)),
        "fixed": (40, request_config(server, {"kv_budget": 64}, block_size=BS)),  # tokens: evicted later
    })  # fmt: skip
    ring = runtime.decode_ring
    assert [ring.slot_of(rid) is not None for rid in ("full", "none", "fixed")] == [False, False, True]
    life.run(3 * EVERY + 1)
    assert runtime.requests["full"].decode is None and runtime.requests["none"].decode is None
    assert {r.req_id for r in life.records if r.phase == "decode"} == {"fixed"}
    assert not server.model_copy(update={"budget": 1.0}).evicts_while_decoding
    assert server.evicts_while_decoding and not server.model_copy(update={"evict_every": None}).evicts_while_decoding


def test_self_check_after_decode_evictions(monkeypatch):
    """VLLM_KVCOMP_VERIFY=N: the first request of N decode batches is read back and its attention checked."""
    monkeypatch.setenv("VLLM_KVCOMP_VERIFY", "2")
    runtime, pool = make_runtime("uniform", budget="0.3")
    server = runtime.config
    life = Life(runtime, pool, seed=10)
    life.prefill({"a": (150, request_config(server, {"kv_compression": "pyramid"})), "b": (170, None)})
    life.run(3 * EVERY + 1)
    decode = [r for r in life.records if r.phase == "decode"]
    assert [r.verify is not None for r in decode] == [True, False] * 2 + [False] * 2  # a, then b, per batch
    for record in decode[:3:2]:
        ring_err = record.verify.pop("ring_lse_abs_err")
        assert record.req_id == "a" and record.verify == {"exact": True, "attention_rel_err": 0.0}
        # the ring's queries against the LSE recorded with them (the harness records exact LSEs)
        assert ring_err is not None and ring_err < 1e-4


def test_self_check_reports_a_ring_whose_queries_do_not_match_their_lse(monkeypatch):
    """The decode-query ring is filled inside CUDA graphs on a GPU: a stale or misplaced row would show
    as queries whose LSE over the live keys differs from the LSE recorded with them."""
    monkeypatch.setenv("VLLM_KVCOMP_VERIFY", "1")
    runtime, pool = make_runtime("uniform", budget="0.3")
    life = Life(runtime, pool, seed=13)
    life.prefill({"a": (150, None)})
    life.run(EVERY - 1)
    ring = runtime.decode_ring
    slot = ring._slot_of_req["a"]
    ring.queries[:, slot] = ring.queries[:, slot].roll(1, dims=1)  # rows one position off
    (report,) = life.run(1)
    (record,) = report.evictions
    assert record.verify["exact"] is True  # the rewrite itself is fine
    assert record.verify["ring_lse_abs_err"] > 1e-2


def test_self_check_after_a_decode_eviction_reports_a_corrupted_page(monkeypatch):
    monkeypatch.setenv("VLLM_KVCOMP_VERIFY", "1")
    runtime, pool = make_runtime("uniform", budget="0.3")
    life = Life(runtime, pool, seed=11)
    life.prefill({"a": (150, None)})
    life.run(EVERY - 1)
    publish = runtime.pages.publish

    def corrupting_publish(published):
        publish(published)
        index, row, plan = published[0]
        (req,) = [r for r in runtime.requests.values() if r.index == index]
        page = logical_pages(plan.after, row, req.seq_len, N)[1, 0]  # layer 1's first kept page
        pool[page] += 1  # its keys and values, after the rewrite

    monkeypatch.setattr(runtime.pages, "publish", corrupting_publish)
    (report,) = life.run(1)  # the eviction step (the next reads would fail the harness's own check)
    (record,) = report.evictions
    assert record.phase == "decode" and record.verify["exact"] is False
    assert record.verify["attention_rel_err"] > 1e-3


def test_decode_evictions_are_timed_into_the_eviction_seconds(monkeypatch):
    """The prefill's EvictionTimer (CUDA events on a GPU, read later without a sync; here the host clock)."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    life = Life(runtime, pool, seed=12)
    life.prefill({"a": (150, None), "b": (170, None)})
    reports = life.run(2 * EVERY + 1)
    timed = {step: len(r.eviction_seconds) for step, r in enumerate(reports) if r is not None and r.eviction_seconds}
    evicted = [step for step, r in enumerate(reports) if r is not None and r.evictions]
    # one entry per request of a batch, in the next step's report: the prefill's, then each decode batch's
    assert evicted == [EVERY - 1, 2 * EVERY - 1] and timed == {0: 2, EVERY: 2, 2 * EVERY: 2}
    # the host's share (planning, enqueueing): in the batch's own report, one entry per request
    host = {step: r.eviction_host_seconds for step, r in enumerate(reports) if r and r.eviction_host_seconds}
    assert sorted(host) == evicted and all(len(v) == 2 and min(v) > 0 for v in host.values())
    runtime, pool = make_runtime("uniform", budget="0.3")
    runtime.observer = FailAt("decode_score")
    life = Life(runtime, pool, seed=12)
    life.prefill({"a": (150, None)})
    reports = [r for r in life.run(EVERY + 1) if r is not None]
    assert sum(len(r.eviction_seconds) for r in reports) == 1  # the prefill only: a failed batch is not timed


def test_fault_before_the_rewrite_leaves_the_pool_bit_identical_and_is_retried():
    runtime, pool = make_runtime("uniform", budget="0.3")
    life = Life(runtime, pool, seed=2)
    life.prefill({"a": (150, None), "b": (170, None)})
    life.run(EVERY - 1)
    for evicted, stage in enumerate(("decode_plan", "decode_score", "decode_compact")):
        runtime.observer = FailAt(stage)
        snapshot: dict = {}
        (report,) = life.run(1, before_end=lambda s=snapshot: s.update(pool=pool.clone(), entries=_entries(runtime)))
        assert torch.equal(pool, snapshot["pool"]) and torch.equal(_entries(runtime), snapshot["entries"])
        assert not report.evictions and not report.failures
        short = stage.removeprefix("decode_")
        assert {(d.req_id, d.reason) for d in report.deferred} == {(r, f"decode_eviction_error_{short}") for r in "ab"}
        runtime.observer = None
        life.run(EVERY - 1)  # the reads still show the old layout; retried EVERY tokens later, not before
        assert len([r for r in life.records if r.phase == "decode"]) == 2 * evicted
        (report,) = life.run(1)
        assert {r.req_id for r in report.evictions} == {"a", "b"} and not report.deferred
        assert runtime.requests["a"].decode.deferred == 0
        life.run(EVERY - 1)  # the next reads check what it kept


def test_queries_whose_lse_is_stale_are_scored_with_a_recomputed_lse(monkeypatch):
    """The ring returns no LSE when a row ran before the last eviction: the scorer recomputes it."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    life = Life(runtime, pool, seed=7)
    life.prefill({"a": (150, None)})
    gather, seen = runtime.decode_ring.gather, []
    monkeypatch.setattr(runtime.decode_ring, "gather", lambda *a: seen.append(1) or (gather(*a)[0], None))
    life.run(EVERY + 2)  # the reads after the eviction check top-k against the reference scorer
    assert seen == [1] and [r.phase for r in life.records] == ["prefill", "decode"]


def _entries(runtime):
    layouts = runtime.pages.layouts
    return torch.cat([layouts.entries, layouts.compact_pages.flatten(), layouts.shift_pages.flatten()]).clone()


def test_requests_given_up_after_repeated_failures():
    runtime, pool = make_runtime("uniform", budget="0.3")
    life = Life(runtime, pool, seed=3)
    life.prefill({"a": (150, None)})
    runtime.observer = FailAt("decode_score")
    reports = [r for r in life.run(MAX_DEFERRED * EVERY + EVERY) if r is not None and r.deferred]
    assert len(reports) == MAX_DEFERRED and runtime.requests["a"].decode.stopped
    assert not [r for r in life.records if r.phase == "decode"]


def test_fault_after_compaction_finishes_the_batch_with_an_error(monkeypatch):
    runtime, pool = make_runtime("uniform", budget="0.3")
    life = Life(runtime, pool, seed=4)
    life.prefill({"a": (150, None), "b": (170, None)})
    life.run(EVERY - 1)

    def broken_publish(compressed):
        raise RuntimeError("injected after compaction")

    monkeypatch.setattr(runtime.pages, "publish", broken_publish)
    (report,) = life.run(1)
    assert not report.evictions and not report.deferred
    assert {(f.req_id, f.reason) for f in report.failures} == {(r, "decode_eviction_error_compact") for r in "ab"}
    assert all(runtime.requests[r].decode.stopped for r in "ab")


def test_ranks_agree_before_and_after_the_rewrite(monkeypatch):
    """Another TP rank failing (seen through any_rank) defers or fails every rank's batch alike."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    life = Life(runtime, pool, seed=5)
    life.prefill({"a": (150, None)})
    life.run(EVERY - 1)
    monkeypatch.setattr(runtime.executor, "any_rank", lambda flags: [True] * len(flags))  # the other rank failed
    snapshot = {}
    (report,) = life.run(1, before_end=lambda: snapshot.update(pool=pool.clone()))
    assert [d.reason for d in report.deferred] == ["decode_eviction_error_other_rank_score"]
    assert torch.equal(pool, snapshot["pool"])
    calls = []
    # before the rewrite all agree; afterwards the other rank reports a failure after its compaction
    monkeypatch.setattr(
        runtime.executor, "any_rank", lambda flags: calls.append(flags) or ([True, True] if len(calls) == 2 else flags)
    )
    (report,) = life.run(EVERY)[-1:]
    assert [f.reason for f in report.failures] == ["decode_eviction_error_other_rank_compact"]


def test_without_evict_every_nothing_is_followed():
    runtime, pool = make_runtime("uniform", budget="0.3", evict_every=None)
    life = Life(runtime, pool, seed=6)
    life.prefill({"a": (150, None)})
    assert runtime.requests["a"].decode is None
    assert not any(r.evictions or r.deferred for r in life.run(EVERY + 2) if r is not None)


# ------------------------------------------------------------------ host pieces


def _random_life(rng, layers: int, bs: int, blocks: int):
    """(layout, row, seq_len, plans) of a request after a random prefill eviction and decode evictions."""
    prompt = int(rng.integers(0, 200))
    layout, plans = RequestLayout.uncompressed(layers, bs), []
    first = plan_eviction(rng.integers(0, prompt + 1, layers), prompt, bs)
    if first is not None:
        layout = RequestLayout.from_plan(first)
    seq_len = prompt
    for _ in range(int(rng.integers(0, 4))):
        seq_len += int(rng.integers(0, 80))
        plan = plan_reeviction(layout, rng.integers(0, seq_len + 1, layers), seq_len)
        plans.append(plan)
        layout = plan.after if plan is not None else layout
    seq_len += int(rng.integers(1, 40))
    row = [int(b) for b in rng.permutation(blocks)[: cdiv(seq_len, bs)]]
    return layout, row, seq_len, plans


@pytest.mark.parametrize("seed", range(20))
def test_logical_pages_are_the_reference_page_tables(seed):
    rng = np.random.default_rng(seed)
    layers, bs, blocks = int(rng.integers(1, 5)), int(rng.choice([1, 4, 16])), 500
    layout, row, seq_len, _ = _random_life(rng, layers, bs, blocks)
    pages = logical_pages(layout, row, seq_len, blocks)
    for layer in range(layers):
        reference, live = layout_page_table_reference(row, seq_len, layer, layout, blocks)
        assert pages[layer, : len(reference)].tolist() == reference and not pages[layer, len(reference) :].any()


@pytest.mark.parametrize("seed", range(10))
def test_the_round_page_table_is_each_requests_reference_table(seed):
    """`logical_page_table`: R requests of different layouts and contexts in one pass."""
    rng = np.random.default_rng(100 + seed)
    layers, bs, blocks = int(rng.integers(1, 5)), int(rng.choice([1, 4, 16])), 500
    lives = [_random_life(rng, layers, bs, blocks) for _ in range(int(rng.integers(1, 7)))]
    rows = [np.asarray(row, dtype=np.int64) for _, row, _, _ in lives]
    table = logical_page_table([life[0] for life in lives], rows, [life[2] for life in lives], blocks)
    assert table.shape[:2] == (layers, len(lives))
    for r, (layout, row, seq_len, _) in enumerate(lives):
        for layer in range(layers):
            reference, _ = layout_page_table_reference(row, seq_len, layer, layout, blocks)
            got = table[layer, r]
            assert got[: len(reference)].tolist() == reference and not got[len(reference) :].any()


def _compaction_rows_reference(plans, layers, bs, per_layer, score_of=None):
    """One column per (layer of `layers`, request) that loses tokens, in layer-major order."""
    R, columns = len(plans), []
    for g, layer in enumerate(layers):
        for r, plan in enumerate(plans):
            if plan is None or not plan.evicted_layers[layer]:
                continue
            length_row = layer * R + r if per_layer else r
            score = (score_of[g] if score_of is not None else g) * R + r
            domain, keep = int(plan.domain_pages[layer]) * bs, int(plan.compact_pages[layer]) * bs
            columns.append([g * R + r, domain, keep, length_row, score])
    return np.asarray(columns, dtype=np.int64).reshape(-1, 5).T


@pytest.mark.parametrize("seed", range(10))
def test_compaction_rows_are_the_per_layer_and_request_loop(seed):
    rng = np.random.default_rng(200 + seed)
    layers, bs = int(rng.integers(1, 6)), int(rng.choice([1, 4, 16]))
    plans = [plan for _ in range(6) for plan in _random_life(rng, layers, bs, 500)[3]]
    rng.shuffle(plans)  # some None: requests with nothing to free
    start = int(rng.integers(0, layers))
    group = range(start, int(rng.integers(start + 1, layers + 1)))
    score_of = sorted(int(x) for x in rng.integers(0, len(group), len(group)))
    for per_layer in (True, False):
        for scored_by in (None, score_of):
            got = compaction_rows(plans, group, bs, per_layer, scored_by)
            want = _compaction_rows_reference(plans, group, bs, per_layer, scored_by)
            assert got.dtype == np.int64 and got.tolist() == want.tolist()


def test_decode_budgets_keep_the_prefill_ratios_at_the_new_average():
    config = build_config(method="uniform", budget=0.2, overrides={"num_sinks": 4, "num_recent": 64})
    ratios = np.array([0.5, 1.5, 1.0, 1.0])
    budgets = decode_budgets(ratios, config, 4000)
    assert budgets.sum() == 4 * 800 and budgets.tolist() == [400, 1200, 800, 800]
    small = decode_budgets(ratios, config, 400)  # B_avg = 80: the floor (68) binds the small layer
    assert small.sum() == 320 and small.min() >= 68 and small.argmax() == 1
    fixed = build_config(method="uniform", budget=1024, overrides={"num_sinks": 4, "num_recent": 64})
    assert decode_budgets(ratios, fixed, 5000).tolist() == decode_budgets(ratios, fixed, 90000).tolist()
    assert decode_budgets(np.ones(3), fixed, 500).tolist() == [500, 500, 500]  # within budget: everything


@pytest.mark.parametrize("budget", ["0.2", "0.05", "1024", "70", "1.0"])
@pytest.mark.parametrize("seq_len", [1, 67, 68, 400, 1100, 17000])
def test_decode_budgets_of_equal_ratios_are_what_allocate_gives(budget, seq_len):
    """The equal-ratio shortcut (uniform, and requests without prefill statistics) returns exactly the
    policies' `allocate` result, without its cost at every decode eviction."""
    from vllm_kvcomp.policies.base import allocate

    config = build_config(method="uniform", budget=budget, overrides={"num_sinks": 4, "num_recent": 64})
    for ratios in (np.ones(16), np.full(5, 0.25)):
        average = config.average_budget(seq_len)
        floor = min(config.protected_tokens, seq_len)
        expected = allocate(ratios * average, len(ratios) * average, floor, seq_len)
        got = decode_budgets(ratios, config, seq_len)
        assert got.dtype == expected.dtype and got.tolist() == expected.tolist()


def test_the_runner_writes_rehomed_ids_into_the_live_request_only():
    from vllm_kvcomp.engine.worker import CompressionModelRunner

    runtime, _ = make_runtime()
    runtime.add_request("a", index=1, block_ids=[5, 6, 7, 8], prompt_len=60)
    runtime.add_request("b", index=2, block_ids=[9, 10], prompt_len=20)
    calls = []
    runner = object.__new__(CompressionModelRunner)
    runner.kvcomp = runtime
    runner.block_tables = SimpleNamespace(
        blocks_per_kv_block=[2], block_tables=[SimpleNamespace(stage_write=lambda *a: calls.append(a))]
    )
    a, b = runtime.requests["a"], runtime.requests["b"]
    runtime.decode_evictor._row_writes += [(a, 1, [8]), (b, 0, [10])]
    runtime.add_request("b", index=2, block_ids=[11], prompt_len=10)  # b was preempted and is back: drop
    runner.write_rehomed_rows()
    assert calls == [(1, 2, [16, 17])]  # kernel blocks of 2: KV block 8 at position 1 -> 16, 17 at 2
    runner.write_rehomed_rows()
    assert calls == [(1, 2, [16, 17])]  # taken once


def test_decode_evictions_have_their_own_counters():
    from prometheus_client import generate_latest

    from vllm_kvcomp.engine.metrics import CompressionMetrics
    from vllm_kvcomp.engine.records import EvictionRecord

    metrics = CompressionMetrics(build_config(method="uniform", overrides={"metrics_port": None}))
    metrics.record_eviction(EvictionRecord("a", [1, 2], 100, [20, 36]), blocks_freed=2)
    for context in (132, 164):
        record = EvictionRecord("a", [3], context, [40, 40], phase="decode", evicted_tokens=[16, 32])
        metrics.record_eviction(record, blocks_freed=1)
    metrics.record_decode_deferred("decode_eviction_error_score")
    text = generate_latest(metrics.registry).decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["vllm_kvcomp_requests_compressed_total"]) == 1  # the prefill counters stay the prefill's
    assert float(lines["vllm_kvcomp_blocks_freed_total"]) == 2
    assert float(lines['vllm_kvcomp_tokens_evicted_total{layer="1"}']) == 64
    assert float(lines["vllm_kvcomp_decode_evictions_total"]) == 2
    assert float(lines["vllm_kvcomp_decode_blocks_freed_total"]) == 2
    assert float(lines['vllm_kvcomp_decode_tokens_evicted_total{layer="0"}']) == 32
    assert float(lines['vllm_kvcomp_decode_tokens_evicted_total{layer="1"}']) == 64
    assert float(lines['vllm_kvcomp_decode_evictions_deferred_total{reason="decode_eviction_error_score"}']) == 1


def _planned_life(seed, plan_ahead, monkeypatch):
    """The whole-life stream of three requests; returns (records, rows, each planning's (request,
    context planned for, context then))."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    server = runtime.config
    planner, planned = runtime.decode_evictor.planner, []
    plan = planner.plan
    monkeypatch.setattr(planner, "plan", lambda req, s: planned.append((req.req_id, s, req.seq_len)) or plan(req, s))
    if not plan_ahead:
        monkeypatch.setattr(planner, "plan_ahead", lambda req_ids, contexts: None)
    life = Life(runtime, pool, seed=seed)
    life.prefill({
        "a": (150, request_config(server, {"kv_compression": "pyramid"})),
        "b": (200, request_config(server, {"kv_budget": 96})),
        "c": (40, request_config(server, {"kv_budget": 64})),  # within budget: followed from its first step
    })  # fmt: skip
    life.run(4 * EVERY + 3)  # every read checked against what each eviction kept
    records = [(r.req_id, r.phase, r.prompt_len, r.kept_tokens, r.freed_block_ids) for r in life.records]
    return records, {rid: runtime.requests[rid].block_ids for rid in "abc"}, planned


def test_plans_made_ahead_are_the_plans_made_when_due(monkeypatch):
    """Planning ahead moves the host planning out of the due step and changes nothing else: the same
    evictions, freed ids and rows as planning every eviction in its due step."""
    records, rows, planned = _planned_life(3, True, monkeypatch)
    when_due, due_rows, due_planned = _planned_life(3, False, monkeypatch)
    assert records == when_due and rows == due_rows
    assert [r for r in records if r[1] == "decode"], "no decode eviction"
    assert all(s == now for _, s, now in due_planned)  # without it: every plan in its due step
    # with it: every eviction was planned in an earlier step, each (request, context) once
    ahead = [(rid, s) for rid, s, now in planned if s > now]
    assert len(ahead) == len(planned) and len(set(ahead)) == len(ahead)
    evicted = {(r[0], r[2]) for r in records if r[1] == "decode"}
    assert evicted <= set(ahead) and ("c", 40 + EVERY) in ahead  # c's first frees nothing: planned all the same


def test_a_plan_made_ahead_holds_only_for_its_context_and_layout():
    from vllm_kvcomp.engine.requests import DecodeState

    state = DecodeState.after_prefill(None, None, 0, 100, L, BS)
    plan = plan_reeviction(state.layout, [40] * L, 132, SINKS, RECENT)
    state.next_plan = (132, state.layout, plan)
    assert state.planned(132) == (True, plan)
    assert state.planned(133) == (False, None)  # reached another context (several tokens in a step)
    state.layout = RequestLayout.uncompressed(L, BS)  # an equal layout, but not the one planned from
    assert state.planned(132) == (False, None)
    state.next_plan = (140, state.layout, None)  # planned: nothing to free
    assert state.planned(140) == (True, None)


def _checked_life(seed, monkeypatch, check_all: bool):
    """The three-request stream of `_planned_life`; returns (records, rows, `_due` calls).
    `check_all`: every followed request is checked at every step (no per-index lower bound)."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    server, evictor, calls = runtime.config, runtime.decode_evictor, []
    due = evictor._due
    monkeypatch.setattr(evictor, "_due", lambda req: calls.append(req.req_id) or due(req))
    if check_all:
        monkeypatch.setattr(evictor, "_next_context", lambda req: 0)
    life = Life(runtime, pool, seed=seed)
    life.prefill({
        "a": (150, request_config(server, {"kv_compression": "pyramid"})),
        "b": (200, request_config(server, {"kv_budget": 96})),
        "c": (40, request_config(server, {"kv_budget": 64})),  # within budget: followed from its first step
        "d": (120, request_config(server, {"kv_budget": 1.0})),  # never evicted while decoding: never checked
    })  # fmt: skip
    life.run(4 * EVERY + 3)
    records = [(r.req_id, r.phase, r.prompt_len, r.kept_tokens, r.freed_block_ids) for r in life.records]
    return records, {rid: runtime.requests[rid].block_ids for rid in "abcd"}, calls


@pytest.mark.parametrize("seed", [3, 4])
def test_the_per_step_check_skips_only_requests_that_cannot_be_due(seed, monkeypatch):
    """`_next_check` (a lower bound on each request's next due context) changes no eviction: the same
    records and rows as checking every followed request at every step, with far fewer checks."""
    records, rows, calls = _checked_life(seed, monkeypatch, check_all=False)
    every_step, every_rows, all_calls = _checked_life(seed, monkeypatch, check_all=True)
    assert records == every_step and rows == every_rows
    assert sum(r[1] == "decode" for r in records) >= 3, "too few decode evictions to compare"
    assert "d" not in calls and "d" not in all_calls  # budget 1.0: not followed at all
    assert len(calls) < len(all_calls) / 4


def test_decode_evictions_are_a_named_range_in_a_profile():
    """bench/step_profile.py reads the `kvcomp::` ranges of a torch-profiler trace."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    life = Life(runtime, pool, seed=12)
    life.prefill({"a": (150, None)})
    life.run(EVERY - 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        reports = life.run(2)  # the eviction step is one of these
    assert any(r is not None and r.evictions for r in reports)
    assert "kvcomp::decode_evictions" in {event.key for event in prof.key_averages()}


def _staggered_life(seed, monkeypatch, join: bool):
    """Four requests admitted at different steps; returns (decode records, (step, size) of each round)."""
    from vllm_kvcomp.engine import decode_eviction

    if not join:  # a request would have to grow by 10 intervals to join: never (it is due first)
        monkeypatch.setattr(decode_eviction, "JOIN_FRACTION", 10.0)
    runtime, pool = make_runtime("uniform", budget="0.3")
    evictor, steps, rounds = runtime.decode_evictor, [], []
    step, evict = evictor.step, evictor.evict
    monkeypatch.setattr(evictor, "step", lambda: steps.append(1) or step())
    monkeypatch.setattr(evictor, "evict", lambda reqs: rounds.append((len(steps), len(reqs))) or evict(reqs))
    life = Life(runtime, pool, seed=seed)
    for req_id, prompt, run in (("a", 150, 3), ("b", 170, 9), ("c", 130, 14), ("d", 160, 5 * EVERY)):
        life.prefill({req_id: (prompt, None)})
        life.run(run)  # every read checked against what each eviction kept, and the memory bound
    return [r for r in life.records if r.phase == "decode"], rounds


@pytest.mark.parametrize("seed", [5, 6])
def test_requests_admitted_apart_share_rounds(seed, monkeypatch):
    """Requests of the step that have grown by 3/4 of their interval join a round others are due in:
    rounds at least a quarter interval apart (at most 4 per interval, however staggered the requests),
    each request evicted at most a quarter interval early and never late."""
    decode, rounds = _staggered_life(seed, monkeypatch, join=True)
    alone, alone_rounds = _staggered_life(seed, monkeypatch, join=False)
    assert {size for _, size in alone_rounds} == {1} and len(alone_rounds) == len(alone)  # one request per round
    assert len(rounds) <= 0.6 * len(alone_rounds) and max(size for _, size in rounds) >= 3
    assert np.diff([step for step, _ in rounds]).min() > EVERY // 4
    prompts = {"a": 150, "b": 170, "c": 130, "d": 160}
    for req_id, prompt in prompts.items():
        contexts = [prompt] + [r.prompt_len for r in decode if r.req_id == req_id]
        growth = np.diff(contexts)
        assert len(growth) >= 4 and growth.min() >= EVERY * 3 // 4 and growth.max() <= EVERY, (req_id, growth)

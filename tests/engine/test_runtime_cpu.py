"""The worker-side eviction path end to end on CPU (kernels under TRITON_INTERPRET=1).

Builds a KV pool the way the plugin's worker does (one tensor, L regions of N
pages), fills prompts through scrambled block ids, lets the runtime score,
size, select, compact and relocate, then reads every layer back through the
page tables the attention backend would hand to FlashAttention, and checks:
  * each layer/head holds exactly its budget of prompt tokens, all distinct,
    in position order, sinks and recent tokens included, K and V moved together,
    and they are the top-scoring tokens by the reference scorer;
  * tokens decoded after compression (written by vLLM's unchanged slot mapping)
    follow the survivors;
  * attention over the page table equals dense attention over the kept tokens;
  * freed blocks are never referenced, other requests' pages are untouched.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from vllm_kvcomp.kernels.reference import gather_kv, window_lse_reference, window_scores_reference

from vllm_kvcomp.config import build_config
from vllm_kvcomp.engine.layout import cdiv
from vllm_kvcomp.engine.requests import WindowRows
from vllm_kvcomp.engine.runtime import CompressionRuntime

L, HKV, G, D, BS, N, WIDTH = 3, 2, 2, 32, 16, 48, 24
HQ = HKV * G
ORACLE = Path(__file__).with_name("needle_oracle.py")
SCALE = D**-0.5


def make_runtime(method="uniform", budget="0.35", **overrides):
    options = dict(window=8, num_recent=16, num_sinks=2, pool_kernel=3, max_pending_requests=4, metrics_port=None)
    if method == "profile":  # a calibrated profile of this 3-layer model
        options["profile"] = {"layer_weights": [3.0, 1.0, 2.0]}
    options.update(overrides)
    config = build_config(method=method, budget=budget, overrides=options)
    runtime = CompressionRuntime(config, vllm_config=None)
    pool = torch.randn(L * N, 2, BS, HKV, D, dtype=torch.bfloat16)
    runtime.setup(
        layer_names=[f"model.layers.{i}.attn" for i in range(L)],
        pool=pool,
        blocks_per_layer=N,
        block_size=BS,
        num_heads=HQ,
        scale=SCALE,
        max_reqs=6,
        width=WIDTH,
    )
    return runtime, pool


def stock_pages(row, layer):
    return torch.tensor([layer * N + b for b in row], dtype=torch.int32)


def prepare(runtime, pool, prompts, decode, seed=0):
    """Register requests whose windows were captured (queries + FlashAttention-style LSE)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(N - 1, generator=g) + 1  # 0 is vLLM's null block
    rows, offset = [], 0
    for p, d in zip(prompts, decode):
        n = cdiv(p + d, BS)
        rows.append(ids[offset : offset + n].tolist())
        offset += n
    reqs = []
    for i, (p, row) in enumerate(zip(prompts, rows)):
        runtime.add_request(f"req{i}", index=i + 1, block_ids=row[: cdiv(p, BS)], prompt_len=p)
        req = runtime.requests[f"req{i}"]
        window = min(runtime.config.window, p)
        buffers = runtime.capture_buffers
        req.rows = WindowRows(buffers.free_slots.pop(), window, np.ones(window, dtype=bool))
        for layer in range(L):
            keys = gather_kv(pool, stock_pages(row, layer), p, kv=0)
            q = torch.randn(window, HQ, D, generator=g).to(torch.bfloat16)
            buffers.queries[layer, req.rows.slot, :window] = q
            buffers.lse[layer, req.rows.slot, :window] = window_lse_reference(q, keys, scale=SCALE)
        reqs.append(req)
    return rows, reqs


def positions_of(read, snapshot_tokens):
    """Map each read-back vector to the unique prompt position holding it."""
    eq = (read[:, None, :] == snapshot_tokens[None, :, :]).all(-1)  # [k, P]
    assert (eq.sum(1) == 1).all(), "a survivor matches no (or several) prompt tokens"
    return eq.float().argmax(1)


@pytest.mark.parametrize("method", ["uniform", "zigzag", "pyramid", "profile"])
def test_eviction_path_reads_back_the_survivors(method):
    runtime, pool = make_runtime(method)
    prompts, decode = [150, 97, 300], [21, 0, 5]
    rows, reqs = prepare(runtime, pool, prompts, decode, seed=hash(method) % 1000)
    bystander = [b for b in range(1, N) if all(b not in r for r in rows)][:3]
    snapshot = pool.clone()
    windows = [runtime.capture_buffers.queries[:, req.rows.slot, : req.rows.window].clone() for req in reqs]
    records = runtime._evict(reqs).evictions
    assert [r.req_id for r in records] == ["req0", "req1", "req2"]
    assert sorted(runtime.capture_buffers.free_slots) == [0, 1, 2, 3]  # capture slots released
    if method == "profile":  # weights [3, 1, 2]: the layers keep in that order (whole pages)
        kept = records[2].kept_tokens
        assert kept[0] > kept[2] > kept[1]
    # Decode after compression: vLLM writes new tokens through the stock slot
    # mapping into each layer's own region (page l*N + block).
    new_tokens = {}
    for i, (p, d) in enumerate(zip(prompts, decode)):
        for layer in range(L):
            for pos in range(p, p + d):
                kv = torch.randn(2, HKV, D).to(torch.bfloat16)
                pool[layer * N + rows[i][pos // BS], :, pos % BS] = kv
                new_tokens[(i, layer, pos)] = kv
    # The batch of the next step, in a scrambled order; attention reads these tables.
    order = [2, 0, 1]
    block_table = torch.zeros(len(order), WIDTH, dtype=torch.int32)
    for r, i in enumerate(order):
        block_table[r, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.int32)
    runtime._idx_mapping = torch.tensor([reqs[i].index for i in order], dtype=torch.int32)
    runtime._num_reqs = len(order)
    seq_lens = torch.tensor([prompts[i] + decode[i] for i in order], dtype=torch.int32)
    tables, lens = runtime.layer_tables(block_table, seq_lens)

    for r, i in enumerate(order):
        p, record = prompts[i], records[i]
        freed = set(record.freed_block_ids)
        # freed blocks are whole prompt blocks before the boundary block
        assert freed and freed <= set(rows[i][: p // BS])
        assert sum(record.kept_tokens) < p * L
        for layer in range(L):
            kept = record.kept_tokens[layer]
            live = int(lens[layer][r])
            assert live == kept + decode[i]
            pages = tables[layer][r, : cdiv(live, BS)].long()
            assert freed.isdisjoint((pages % N).tolist())
            read = pool[pages].transpose(0, 1).reshape(2, -1, HKV, D)[:, :live]  # [2, live, Hkv, D]
            prompt_k = gather_kv(snapshot, stock_pages(rows[i], layer), p, kv=0)
            prompt_v = gather_kv(snapshot, stock_pages(rows[i], layer), p, kv=1)
            scores, _ = window_scores_reference(
                windows[i][layer], prompt_k, scale=SCALE, pool_kernel=3, pool_type="max", square=False
            )
            dense_k = torch.empty(live, HKV, D, dtype=torch.bfloat16)
            dense_v = torch.empty(live, HKV, D, dtype=torch.bfloat16)
            for h in range(HKV):
                pos = positions_of(read[0, :kept, h].float(), prompt_k[:, h].float())
                assert torch.equal(read[1, :kept, h], prompt_v[pos, h]), "values did not move with keys"
                assert (pos[1:] > pos[:-1]).all(), "survivors out of order"
                must = set(range(2)) | set(range(p - 16, p))
                assert must <= set(pos.tolist()), "a sink or recent token was evicted"
                # top-k by the reference scorer, up to bf16 rounding of near ties
                chosen = torch.zeros(p, dtype=torch.bool)
                chosen[pos] = True
                free = torch.ones(p, dtype=torch.bool)
                free[list(must)] = False
                free[(p // BS) * BS :] = False  # the boundary block is kept whole
                if (chosen & free).any() and (~chosen & free).any():
                    assert scores[h][chosen & free].min() >= scores[h][~chosen & free].max() - 2e-2 * scores[h].max()
                # the dense reference: the snapshot's kept tokens, then the decoded ones
                dense_k[:kept, h], dense_v[:kept, h] = prompt_k[pos, h], prompt_v[pos, h]
                for t in range(decode[i]):
                    dense_k[kept + t, h], dense_v[kept + t, h] = new_tokens[(i, layer, p + t)][:, h]
            # attention over the page table == dense attention over the kept tokens
            qd = torch.randn(HQ, D)
            paged = _attend(qd, read[0].float(), read[1].float())
            assert torch.allclose(paged, _attend(qd, dense_k.float(), dense_v.float()), atol=1e-6)
    # blocks of a request outside the batch are bit-identical
    for b in bystander:
        for layer in range(L):
            assert torch.equal(pool[layer * N + b], snapshot[layer * N + b])


def _attend(q, k, v):
    # q [HQ, D], k/v [T, HKV, D] -> [HQ, D] (GQA)
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    logits = torch.einsum("hd,thd->ht", q, k) * SCALE
    return torch.einsum("ht,thd->hd", logits.softmax(-1), v)


def test_budget_one_evicts_nothing():
    runtime, pool = make_runtime("uniform", budget="1.0")
    assert not runtime.config.should_compress(150)


def test_request_that_cannot_free_a_block_is_left_alone():
    runtime, pool = make_runtime("uniform", budget="0.9")
    rows, reqs = prepare(runtime, pool, [40], [0])
    snapshot = pool.clone()
    (record,) = runtime._evict(reqs).evictions
    assert record.freed_block_ids == [] and record.kept_tokens == [40] * L
    assert torch.equal(pool, snapshot)


def test_self_check_with_oracle_needle(monkeypatch):
    """engine/verify.py with the tests' needle oracle, as the GPU run uses them: exact read-back, needle kept."""
    monkeypatch.setenv("VLLM_KVCOMP_VERIFY", "1")
    monkeypatch.setenv("VLLM_KVCOMP_OBSERVER", f"{ORACLE}:NeedleOracle")
    monkeypatch.setenv("VLLM_KVCOMP_FORCE_KEEP", "40:46")
    runtime, pool = make_runtime("zigzag", budget="0.25")
    rows, reqs = prepare(runtime, pool, [200, 120], [0, 0], seed=3)
    records = runtime._evict(reqs).evictions
    check = records[0].verify
    assert check == {"exact": True, "needle": True, "attention_rel_err": check["attention_rel_err"]}
    assert check["attention_rel_err"] < 1e-5
    assert records[1].verify is None  # one request per VLLM_KVCOMP_VERIFY unit


def test_self_check_detects_corruption(monkeypatch):
    monkeypatch.setenv("VLLM_KVCOMP_VERIFY", "1")
    runtime, pool = make_runtime("uniform", budget="0.25")
    rows, reqs = prepare(runtime, pool, [200], [0], seed=4)
    compact = runtime.executor.compact

    def corrupting_compact(*args, **kwargs):
        out = compact(*args, **kwargs)
        pool[rows[0][0]] += 1  # layer 0, first retained page: scribble after compaction
        return out

    runtime.executor.compact = corrupting_compact
    (record,) = runtime._evict(reqs).evictions
    assert record.verify["exact"] is False and record.verify["attention_rel_err"] > 1e-3


def test_per_request_method_and_budget_in_one_batch():
    """Requests of one batch keep what their own (per-request) budgets say."""
    from vllm_kvcomp.config import request_config

    runtime, pool = make_runtime("uniform", budget="0.35")
    prompts = [200, 200, 200]
    rows, reqs = prepare(runtime, pool, prompts, [0, 0, 0], seed=7)
    overrides = [{"kv_budget": 0.2}, {}, {"kv_compression": "zigzag", "kv_budget": "0.6"}]
    for req, extra in zip(reqs, overrides):
        req.config = request_config(runtime.config, extra)
    records = runtime._evict(reqs).evictions
    for record, budget in zip(records, [0.2, 0.35, 0.6]):
        avg_kept = sum(record.kept_tokens) / L
        # budgets are rounded up to whole pages per layer, the boundary block kept whole
        assert budget * 200 <= avg_kept <= budget * 200 + 2 * BS, (budget, record.kept_tokens)
    assert len(records[0].freed_block_ids) > len(records[1].freed_block_ids) > len(records[2].freed_block_ids)
    assert set(runtime.policies._policies) == {"uniform", "zigzag"}


def test_per_request_none_is_served_uncompressed():
    from vllm_kvcomp.config import request_config

    runtime, _ = make_runtime("uniform", budget="0.35")
    runtime.add_request(
        "r",
        index=1,
        block_ids=list(range(1, 20)),
        prompt_len=300,
        config=request_config(runtime.config, {"kv_compression": "none"}),
    )
    assert not runtime.requests["r"].compress
    runtime.add_request("s", index=2, block_ids=list(range(20, 39)), prompt_len=300)
    assert runtime.requests["s"].compress


def test_model_runner_hands_each_request_its_own_config(monkeypatch):
    """CompressionModelRunner.add_requests: SamplingParams.extra_args -> runtime config."""
    from types import SimpleNamespace

    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_kvcomp.engine.worker import CompressionModelRunner

    monkeypatch.setattr(GPUModelRunner, "add_requests", lambda self, scheduler_output: None)
    runtime, _ = make_runtime("zigzag", budget="0.25")
    runner = object.__new__(CompressionModelRunner)
    runner.kvcomp = runtime
    runner.req_states = SimpleNamespace(req_id_to_index={"a": 1, "b": 2, "c": 3})
    prompt = list(range(400))
    new = [
        # "a" was preempted after 37 tokens: it re-prefills prompt + output, its prompt is still 400 tokens
        SimpleNamespace(
            req_id="a",
            block_ids=([1, 2],),
            sampling_params=SamplingParams(),
            prompt_token_ids=prompt,
            prefill_token_ids=prompt + list(range(37)),
        ),
        SimpleNamespace(
            req_id="b",
            block_ids=([3, 4],),
            sampling_params=SamplingParams(extra_args={"kv_compression": "uniform", "kv_budget": 0.5}),
            prompt_token_ids=prompt,
        ),
        SimpleNamespace(
            req_id="c",
            block_ids=([5, 6],),
            sampling_params=SamplingParams(extra_args={"kv_compression": "none"}),
            prompt_token_ids=prompt,
        ),
    ]
    runner.add_requests(SimpleNamespace(scheduled_new_reqs=new))
    a, b, c = (runtime.requests[k] for k in "abc")
    assert (a.config.method, a.config.budget, a.compress) == ("zigzag", 0.25, True)
    assert (b.config.method, b.config.budget, b.compress) == ("uniform", 0.5, True)
    assert (c.config.method, c.compress) == ("none", False)
    assert a.index == 1 and b.block_ids == [3, 4] and a.prompt_len == 400


@pytest.mark.parametrize("method", ["uniform", "zigzag"])
def test_a_workspace_too_small_for_a_request_gives_the_same_result(method, monkeypatch):
    """Layer groups (engine/memory.py) score twice but decide and move exactly the same tokens."""
    monkeypatch.setenv("VLLM_KVCOMP_VERIFY", "1")
    prompts = [300, 180, 250]
    results = []
    for workspace in (None, 1):  # default: one pass over every layer; 1 byte: one layer and one request at a time
        torch.manual_seed(5)  # the same pool contents for both runs
        runtime, pool = make_runtime(method, budget="0.3")
        if workspace is not None:
            runtime.evictor.workspace_bytes = workspace
        rows, reqs = prepare(runtime, pool, prompts, [0, 0, 0], seed=11)
        records = runtime._evict(reqs).evictions
        results.append((pool, records))
    (pool_a, rec_a), (pool_b, rec_b) = results
    assert torch.equal(pool_a, pool_b)
    assert [(r.freed_block_ids, r.kept_tokens) for r in rec_a] == [(r.freed_block_ids, r.kept_tokens) for r in rec_b]
    assert rec_b[0].verify["exact"] and rec_b[0].verify["attention_rel_err"] < 1e-5


def test_layer_groups_fit_the_budget():
    from vllm_kvcomp.engine.memory import layer_groups, workspace_bytes_per_row

    assert layer_groups(32, 100, 1000) == [range(0, 10), range(10, 20), range(20, 30), range(30, 32)]
    assert layer_groups(4, 10**9, 1) == [range(i, i + 1) for i in range(4)]  # at least one layer per group
    assert layer_groups(4, 1, 10**9) == [range(0, 4)]
    # 8B shapes (32 query / 8 KV heads per rank) at 128k tokens: ~42 MB per layer -> 6 layers per 256 MiB pass
    per_layer = workspace_bytes_per_row(32, 8, 131072)
    assert len(layer_groups(32, per_layer, 256 << 20)[0]) == 6


def test_requests_are_chunked_by_their_longest_prompt(monkeypatch):
    """Rows of a chunk are padded to its longest prompt: the workspace estimate must count that."""
    from vllm_kvcomp.engine.memory import workspace_bytes_per_row

    runtime, pool = make_runtime("uniform", budget="0.3")
    rows, reqs = prepare(runtime, pool, [300, 40, 40], [0, 0, 0], seed=12)
    # room for two rows of 300 tokens per layer, not three: the 40-token prompts pad to 300
    runtime.evictor.workspace_bytes = 2 * L * workspace_bytes_per_row(HQ, HKV, 300)
    chunks = []
    evict_chunk = runtime.evictor._evict_chunk
    monkeypatch.setattr(runtime.evictor, "_evict_chunk", lambda r, g: chunks.append(len(r)) or evict_chunk(r, g))
    runtime._evict(reqs)
    assert chunks == [2, 1]


def _evict_counting_statistics(zigzag_request: bool, compute_all: bool, monkeypatch):
    """Two requests evicted in one batch; returns (records, calls of agree / local_statistics)."""
    from vllm_kvcomp.config import request_config

    runtime, pool = make_runtime("uniform", budget="0.35")
    calls: list[str] = []
    agree, local = runtime.executor.agree, runtime.executor.local_statistics
    monkeypatch.setattr(runtime.executor, "agree", lambda *a, **k: calls.append("agree") or agree(*a, **k))
    monkeypatch.setattr(runtime.executor, "local_statistics", lambda *a: calls.append("local") or local(*a))
    if compute_all:  # as before: every batch computes and agrees
        monkeypatch.setattr(type(runtime.evictor), "_needs_stats", lambda self, req: True)
    rows, reqs = prepare(runtime, pool, [200, 180], [0, 0], seed=3)
    if zigzag_request:
        reqs[1].config = request_config(runtime.config, {"kv_compression": "zigzag"})
    return runtime._evict(reqs).evictions, calls


@pytest.mark.parametrize("zigzag_request", [False, True])
def test_statistics_are_read_back_only_when_a_method_needs_them(zigzag_request, monkeypatch):
    """Uniform budgets need no statistics: at TP=1 neither computed nor read back (the read-back waits
    for the step's forward); one zigzag request in the batch brings both back. The kept tokens and
    freed ids are the same either way."""
    kept = {}
    for compute_all in (False, True):
        records, calls = _evict_counting_statistics(zigzag_request, compute_all, monkeypatch)
        assert len(records) == 2 and all(r.freed_block_ids for r in records)
        assert ("agree" in calls) == (compute_all or zigzag_request) and ("local" in calls) == ("agree" in calls)
        kept[compute_all] = [(r.req_id, r.kept_tokens, r.freed_block_ids) for r in records]
        monkeypatch.undo()
    assert kept[False] == kept[True]

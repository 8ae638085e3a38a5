"""The decode-query ring (engine/decode_ring.py) on CPU: host planning of the per-token ring
rows from the runner's batch, the attention write, slots, wrap-around and gather, and that
nothing of it exists (or runs in attention) without `evict_every`.

A step is simulated as the runner and the attention backend run it: `plan_step` (or the
runtime's `begin_step`) on a batch shaped like vLLM's InputBatch, then `record` per layer
with the query rows the op sees (padded to the CUDA-graph size where a FULL graph runs)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from runtime_helpers import make_batch
from test_runtime_cpu import HQ, D, L, make_runtime
from vllm_kvcomp.kernels import record_queries_

from vllm_kvcomp.engine import attention
from vllm_kvcomp.engine.decode_eviction import NEVER
from vllm_kvcomp.engine.decode_ring import DecodeRing

W, SLOTS, MAX_TOKENS = 4, 5, 32
SCRATCH = SLOTS * W


def make_ring(slots=SLOTS, window=W):
    return DecodeRing(
        num_layers=L, slots=slots, window=window, num_heads=HQ, head_size=D, dtype=torch.bfloat16,
        max_num_tokens=MAX_TOKENS, max_reqs=8, device="cpu",
    )  # fmt: skip


def decode_batch(positions: dict[str, tuple[int, int]]):
    """One decode token per request: {req_id: (runner index, position)}."""
    return make_batch([(rid, index, pos, 1, False) for rid, (index, pos) in positions.items()])


def value(req: int, pos: int, layer: int) -> float:
    """What the simulated query of (request, position, layer) holds: nonzero, exact in bf16 (< 256)."""
    return float(1 + layer * 64 + req * 32 + pos % 32)


def run_step(ring, batch, reqs_of_token, padded=None):
    """Plan, then the attention write of every layer; token t carries value(reqs_of_token[t], pos, layer)."""
    ring.plan_step(batch)
    n = int(batch.query_start_loc_np[batch.num_reqs])
    positions = np.concatenate(
        [np.arange(c, c + s) for c, s in zip(batch.num_computed_tokens_np, batch.num_scheduled_tokens)]
    )
    T = padded or n  # a FULL graph's op sees the padded size; padding rows hold garbage
    for layer in range(L):
        vals = torch.full((T,), -7.0)
        vals[:n] = torch.tensor([value(r, p, layer) for r, p in zip(reqs_of_token, positions)])
        query = vals.view(T, 1, 1).expand(T, HQ, D).to(torch.bfloat16)
        ring.record(layer, query, vals.view(1, T).expand(HQ, T) + 0.5)


def test_decode_tokens_of_tracked_requests_go_to_their_ring_rows():
    ring = make_ring()
    sa, sb = ring.assign("a", index=2), ring.assign("b", index=0)
    assert (sa, sb) == (0, 1) and ring.slot_of("a") == 0 and ring.slot_of("zz") is None
    ring.plan_step(decode_batch({"a": (2, 10), "b": (0, 7)}))
    assert ring.dst[:2].tolist() == [sa * W + 10 % W, sb * W + 7 % W]
    assert (ring.dst[2:] == SCRATCH).all()


def test_decode_rows_of_several_tokens_take_one_ring_row_each():
    """The general path (more than one token in a decode row: the usual step has one, a fast path):
    each token of a tracked row goes to the ring row of its own position."""
    ring = make_ring()
    sa, sb = ring.assign("a", index=2), ring.assign("b", index=0)
    ring.plan_step(make_batch([("a", 2, 10, 3, False), ("u", 1, 50, 1, False), ("b", 0, 7, 2, False)]))
    assert ring.dst[:6].tolist() == [sa * W + p % W for p in (10, 11, 12)] + [SCRATCH] + [
        sb * W + p % W for p in (7, 8)
    ]
    assert (ring.dst[6:] == SCRATCH).all()


def test_prefill_rows_and_untracked_requests_go_to_scratch():
    ring = make_ring()
    ring.assign("a", index=2)
    ring.assign("p", index=4)  # tracked, but still prefilling: its rows are prompt queries
    batch = make_batch([("a", 2, 33, 1, False), ("u", 3, 50, 1, False), ("p", 4, 0, 5, True)])
    ring.plan_step(batch)
    assert ring.dst[0].item() == 0 * W + 33 % W
    assert (ring.dst[1:] == SCRATCH).all()
    assert not ring.rows_ready("p", 4)


def test_padding_and_the_previous_step_rows_go_to_scratch():
    """A FULL graph replays with T padded: rows past the real tokens, and rows the previous
    (larger) step planned, must point at scratch."""
    ring = make_ring()
    for i, rid in enumerate("abc"):
        ring.assign(rid, index=i)
    ring.plan_step(decode_batch({"a": (0, 8), "b": (1, 9), "c": (2, 10)}))
    assert (ring.dst[:3] != SCRATCH).all()
    run_step(ring, decode_batch({"c": (2, 11)}), reqs_of_token=[2], padded=8)
    assert ring.dst[0].item() == 2 * W + 11 % W and (ring.dst[1:] == SCRATCH).all()
    written = ring.queries[:, :SLOTS].float()
    assert (written != 0).sum() == L * HQ * D  # one row per layer, nothing from the padding
    assert (written[:, 2, 11 % W] == torch.tensor([value(2, 11, layer) for layer in range(L)]).view(L, 1, 1)).all()
    ring.clear_dst()  # a dummy step (profiling, capture) writes scratch only
    assert (ring.dst == SCRATCH).all()


def test_wrap_around_gathers_the_last_window_in_position_order():
    ring = make_ring()
    ring.assign("a", index=5)
    ring.assign("b", index=1)
    reqs = [SimpleNamespace(req_id="a"), SimpleNamespace(req_id="b")]
    start = {"a": 100, "b": 37}
    for step in range(2 * W + 3):
        run_step(ring, decode_batch({"a": (5, start["a"] + step), "b": (1, start["b"] + step)}), reqs_of_token=[0, 1])
    context = [start["a"] + 2 * W + 3, start["b"] + 2 * W + 3]
    assert all(ring.rows_ready(r.req_id, c) for r, c in zip(reqs, context))
    queries, lse = ring.gather(reqs, context)
    assert queries.shape == (L, 2, W, HQ, D) and lse is not None and lse.shape == (L, 2, W, HQ)
    for r, c in enumerate(context):
        for i, pos in enumerate(range(c - W, c)):
            for layer in range(L):
                assert (queries[layer, r, i] == value(r, pos, layer)).all()
                assert (lse[layer, r, i] == value(r, pos, layer) + 0.5).all()
    # An older context was overwritten, a later one not recorded yet.
    assert not ring.rows_ready("a", context[0] - 1) and not ring.rows_ready("a", context[0] + 1)


def test_rows_are_ready_after_window_decode_steps():
    ring = make_ring()
    ring.assign("a", index=0)
    for step in range(W):
        assert not ring.rows_ready("a", 20 + step)
        run_step(ring, decode_batch({"a": (0, 20 + step)}), reqs_of_token=[0])
    assert ring.rows_ready("a", 20 + W)
    with pytest.raises(AssertionError, match="decode queries are recorded"):
        ring.gather([SimpleNamespace(req_id="a")], [20 + W + 1])


def test_a_released_slot_is_reused_empty():
    ring = make_ring(slots=2)
    ring.assign("a", index=3)
    for step in range(W):
        run_step(ring, decode_batch({"a": (3, 40 + step)}), reqs_of_token=[0])
    assert ring.rows_ready("a", 40 + W)
    ring.release("a")  # finished or preempted
    assert ring.slot_of("a") is None and not ring.rows_ready("a", 40 + W)
    ring.plan_step(decode_batch({"a": (3, 40 + W)}))  # its runner index is no longer tracked
    assert (ring.dst == ring.scratch).all()
    assert ring.assign("c", index=6) == 0 and ring.assign("d", index=3) == 1  # slot 0 again, index 3 reused
    assert ring.assign("e", index=7) is None  # no slot left: untracked
    assert not ring.rows_ready("c", 40 + W)  # a's rows are not c's
    run_step(ring, decode_batch({"c": (6, 40 + W)}), reqs_of_token=[2])
    assert not ring.rows_ready("c", 40 + W + 1)


def test_lse_is_none_when_a_row_ran_before_the_last_eviction():
    ring = make_ring()
    ring.assign("a", index=0)
    for step in range(W + 2):
        run_step(ring, decode_batch({"a": (0, 60 + step)}), reqs_of_token=[0])
    req, context = SimpleNamespace(req_id="a"), 60 + W + 2
    ring.note_eviction("a", 60)
    assert ring.gather([req], [context])[1] is not None
    ring.note_eviction("a", context - 1)  # the oldest row ran over keys since evicted
    queries, lse = ring.gather([req], [context])
    assert lse is None and queries.shape == (L, 1, W, HQ, D)


def test_record_writes_rows_and_sends_duplicates_to_scratch():
    rows, T = 3, 5  # 2 slots + scratch
    queries = torch.zeros(rows, W, HQ, D)
    lse_rows = torch.zeros(rows, W, HQ)
    scratch = 2 * W
    dst = torch.tensor([1 * W + 2, scratch, 0 * W + 3, scratch, scratch, scratch, scratch])  # longer than T
    query = torch.arange(T, dtype=torch.float32).view(T, 1, 1).expand(T, HQ, D) + 1
    lse = torch.arange(T, dtype=torch.float32).view(1, T).expand(HQ, T) + 10
    record_queries_(queries, lse_rows, dst, query, lse)  # the ring's write (DecodeRing.record)
    assert (queries[1, 2] == 1).all() and (queries[0, 3] == 3).all()
    assert (lse_rows[1, 2] == 10).all() and (lse_rows[0, 3] == 12).all()
    assert queries[:2].count_nonzero() == 2 * HQ * D and lse_rows[:2].count_nonzero() == 2 * HQ


# ------------------------------------------------------------ wiring


def test_runtime_tracks_enabled_requests_and_plans_every_step():
    from vllm_kvcomp.config import build_config

    runtime, _ = make_runtime("uniform", evict_every=32, decode_window=W)
    ring = runtime.decode_ring
    assert ring is not None and ring.queries.shape == (L, 6 + 1, W, HQ, D) and ring.slots == 6
    runtime.add_request("a", index=1, block_ids=[1, 2], prompt_len=20)
    runtime.add_request("off", index=2, block_ids=[3], prompt_len=20, config=build_config(method="none"))
    assert ring.slot_of("a") == 0 and ring.slot_of("off") is None
    runtime.begin_step(decode_batch({"a": (1, 20), "off": (2, 20)}))
    assert ring.dst[:2].tolist() == [20 % W, ring.scratch]
    runtime.begin_dummy_step()
    assert (ring.dst == ring.scratch).all()
    runtime.remove_request("a")
    assert ring.slot_of("a") is None and ring.free_slots[-1] == 0


@pytest.mark.parametrize(
    "budget, overrides, ring",
    [
        ("1.0", "deny", False),  # no request can lower its budget: no ring, no ring writes, no LSE
        ("1.0", "allow", True),  # a request may ask for kv_budget 0.2 or 2048 tokens
        ("1.0", "budget", True),
        ("0.3", "deny", True),  # the server's own budget evicts while decoding
    ],
)
def test_the_ring_exists_only_when_some_request_can_evict_while_decoding(budget, overrides, ring):
    from vllm_kvcomp.engine.memory import plugin_memory

    runtime, _ = make_runtime("uniform", budget=budget, evict_every=32, decode_window=W, request_overrides=overrides)
    assert (runtime.decode_ring is not None) is ring
    runtime.add_request("a", index=1, block_ids=[1, 2], prompt_len=20)
    runtime.begin_step(decode_batch({"a": (1, 20)}))
    assert runtime.decode_evictor._next_check[1] == (0 if ring and budget != "1.0" else NEVER)
    # the GPU memory reserved for the plugin during vLLM's profile agrees (engine/memory.py)
    model = SimpleNamespace(
        get_num_layers=lambda _: L, get_num_attention_heads=lambda _: HQ, get_head_size=lambda: D,
        dtype=torch.bfloat16, max_model_len=64,
    )  # fmt: skip
    vllm_config = SimpleNamespace(
        model_config=model, parallel_config=None, cache_config=SimpleNamespace(block_size=4),
        scheduler_config=SimpleNamespace(max_num_seqs=6, max_num_batched_tokens=MAX_TOKENS),
    )  # fmt: skip
    assert (plugin_memory(vllm_config, runtime.config).ring_bytes > 0) is ring


def test_without_evict_every_there_is_no_ring():
    runtime, _ = make_runtime("uniform")
    assert runtime.decode_ring is None
    runtime.add_request("a", index=1, block_ids=[1, 2], prompt_len=20)
    runtime.begin_step(decode_batch({"a": (1, 20)}))  # plain decode step: no ring work
    runtime.begin_dummy_step()


class FakeFlashAttention:
    """Stands in for vllm_flash_attn (no CUDA here): records its kwargs, returns a known LSE."""

    def __init__(self):
        self.calls = []

    def __call__(self, **kw):
        self.calls.append(kw)
        out, T = kw["out"], kw["q"].shape[0]
        out.copy_(kw["q"])
        lse = torch.arange(T, dtype=torch.float32).view(1, T).expand(HQ, T).contiguous() + 5
        return (out, lse) if kw["return_softmax_lse"] else out


def _forward(monkeypatch, ring, num_actual_tokens, T):
    fa = FakeFlashAttention()
    monkeypatch.setattr(attention.fa_utils, "flash_attn_varlen_func", fa, raising=False)
    runtime = SimpleNamespace(layer_index={"l1": 1}, decode_ring=ring)
    monkeypatch.setattr(attention, "get_runtime", lambda: runtime)
    impl = object.__new__(attention.CompressedFlashAttentionImpl)
    impl.__dict__.update(
        num_kv_heads=2, scale=D**-0.5, alibi_slopes=None, logits_soft_cap=0.0, vllm_flash_attn_version=3,
        supports_quant_query_input=False, sinks=None,
    )  # fmt: skip
    one = torch.ones(())
    layer = SimpleNamespace(layer_name="l1", _q_scale=one, _k_scale=one, _v_scale=one)
    metadata = SimpleNamespace(
        num_actual_tokens=num_actual_tokens, query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
        max_query_len=1, max_seq_len=64,
        layer_seq_lens=[torch.full((2,), 10 + i, dtype=torch.int32) for i in range(L)],
        layer_block_tables=[torch.full((2, 4), i, dtype=torch.int32) for i in range(L)],
        max_num_splits=0, capture=None, scheduler_metadata=torch.tensor([0, 7], dtype=torch.int32),
    )  # fmt: skip
    query = (torch.arange(T, dtype=torch.float32) + 1).view(T, 1, 1).expand(T, HQ, D).to(torch.bfloat16)
    kv_cache = torch.zeros(4, 2, 16, 2, D, dtype=torch.bfloat16)
    output = torch.zeros(T, HQ, D, dtype=torch.bfloat16)
    impl.forward(layer, query, None, None, kv_cache, metadata, output)
    (call,) = fa.calls
    assert call["seqused_k"] is metadata.layer_seq_lens[1] and call["block_table"] is metadata.layer_block_tables[1]
    return call, output


def test_attention_without_the_ring_asks_no_lse(monkeypatch):
    call, output = _forward(monkeypatch, ring=None, num_actual_tokens=2, T=4)
    assert call["return_softmax_lse"] is False and call["q"].shape[0] == 2
    assert (output[:2, 0, 0] == torch.tensor([1.0, 2.0])).all() and (output[2:] == 0).all()


def test_attention_passes_vllms_ahead_of_time_schedule_to_every_layer(monkeypatch):
    # FA3's schedule from the batch's lengths serves each layer's own shorter length (engine/attention.py)
    call, _ = _forward(monkeypatch, ring=None, num_actual_tokens=2, T=4)
    assert call["scheduler_metadata"].tolist() == [0, 7]
    assert call["seqused_k"].tolist() == [11, 11] and (call["block_table"] == 1).all()  # its layer's, not the batch's


def test_attention_records_decode_rows_of_the_tokens_it_saw(monkeypatch):
    ring = make_ring()
    ring.assign("a", index=0)
    ring.assign("b", index=1)
    ring.plan_step(decode_batch({"a": (0, 9), "b": (1, 14)}))
    call, _ = _forward(monkeypatch, ring=ring, num_actual_tokens=2, T=4)  # PIECEWISE/eager: T unpadded
    assert call["return_softmax_lse"] is True
    assert (ring.queries[1, 0, 9 % W] == 1).all() and (ring.queries[1, 1, 14 % W] == 2).all()
    assert (ring.lse[1, 0, 9 % W] == 5).all() and (ring.lse[1, 1, 14 % W] == 6).all()
    assert ring.queries[[0, 2]].count_nonzero() == 0  # only the op's own layer


def test_the_ring_holds_what_plugin_memory_reserves():
    from vllm_kvcomp.engine.memory import PluginMemory

    ring = make_ring()
    memory = PluginMemory(
        num_layers=L, num_heads=HQ, head_size=D, dtype_bytes=2, max_reqs=8, max_blocks_per_req=4,
        capture_slots=1, window=1, workspace_bytes=0, ring_slots=SLOTS, decode_window=W, max_num_tokens=MAX_TOKENS,
    )  # fmt: skip
    assert ring.nbytes == memory.ring_bytes > 0
    assert PluginMemory(**{**memory.__dict__, "ring_slots": 0}).ring_bytes == 0


def test_gather_checks_a_whole_round_as_rows_ready_does():
    """gather() checks every request of a round at once: the ones it names are exactly those
    rows_ready refuses (untracked, too early, or a row not recorded since the slot was given)."""
    ring = make_ring()
    for i, rid in enumerate("abc"):
        ring.assign(rid, index=i)
    for step in range(W):  # a and b decode W steps; c only the last one
        positions = {"a": (0, 30 + step), "b": (1, 50 + step)}
        if step == W - 1:
            positions["c"] = (2, 70 + step)
        ring.plan_step(decode_batch(positions))
    round_ = [("a", 30 + W), ("b", 50 + W), ("c", 70 + W), ("zz", 90), ("a", 30 + W + 1), ("b", 3)]
    expected = [rid for rid, pos in round_ if not ring.rows_ready(rid, pos)]
    assert expected == ["c", "zz", "a", "b"]
    with pytest.raises(AssertionError) as raised:
        ring.gather([SimpleNamespace(req_id=rid) for rid, _ in round_], [pos for _, pos in round_])
    assert str(raised.value).endswith(str(expected))
    queries, _ = ring.gather([SimpleNamespace(req_id=rid) for rid, _ in round_[:2]], [pos for _, pos in round_[:2]])
    assert queries.shape[1] == 2

"""The per-layer page-table kernel against the layout oracle (TRITON_INTERPRET=1 on CPU)."""

import numpy as np
import pytest
import torch

from vllm_kvcomp.engine.layout import layer_page_table_reference, plan_eviction
from vllm_kvcomp.engine.page_tables import RequestLayouts, build_layer_page_tables


def _state_row(plan, num_layers):
    if plan is None:
        return np.zeros((3, num_layers), dtype=np.int32)
    return np.stack([plan.compact_pages, plan.entry_offsets, plan.shift_pages]).astype(np.int32)


@pytest.mark.parametrize("block_size", [16, 32])
def test_page_tables_match_layout_reference(device, block_size):
    rng = np.random.default_rng(block_size)
    L, N, W, max_reqs = 5, 300, 64, 8
    bs = block_size
    # four requests: two compressed (one with decode growth), one plain, one short
    prompt = [23 * bs + 5, 17 * bs, 40 * bs + 9, 3]
    decoded = [2 * bs + 3, 0, 5, 1]
    budgets = [rng.integers(30, 14 * bs, L), rng.integers(40, 10 * bs, L), None, None]
    blocks = rng.permutation(np.arange(1, N))  # scrambled block ids, 0 is vLLM's null block
    rows, plans, offset = [], [], 0
    for p, d, b in zip(prompt, decoded, budgets):
        n = -(-(p + d) // bs)
        rows.append(blocks[offset : offset + n].tolist())
        offset += n
        plans.append(plan_eviction(np.array(b), p, bs) if b is not None else None)
    assert plans[0] is not None and plans[1] is not None
    # request slots are not batch rows: scramble them
    slots = [5, 0, 3, 7]
    batch_order = [2, 0, 3, 1]
    state = np.zeros((3, max_reqs + 1, L), dtype=np.int32)
    entries = np.zeros(L * N, dtype=np.int32)
    for req, plan in enumerate(plans):
        state[:, slots[req]] = _state_row(plan, L)
        if plan is not None:
            for eb, es, pb, ps in plan.entries():
                entries[es * N + rows[req][eb]] = ps * N + rows[req][pb]
    R_pad = 6  # two padded rows, as in a FULL CUDA graph batch
    block_table = np.zeros((R_pad, W), dtype=np.int32)
    seq_lens = np.zeros(R_pad, dtype=np.int32)
    for r, req in enumerate(batch_order):
        block_table[r, : len(rows[req])] = rows[req]
        seq_lens[r] = prompt[req] + decoded[req]
    tables = torch.full((L, max_reqs, W), -7, dtype=torch.int32, device=device)
    lens = torch.full((L, max_reqs), -7, dtype=torch.int32, device=device)

    def to(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    build_layer_page_tables(
        to(block_table),
        to(seq_lens),
        to(np.array([slots[q] for q in batch_order], dtype=np.int32)),
        len(batch_order),
        RequestLayouts(*to(state), to(entries)),
        tables,
        lens,
        N,
        bs,
    )
    tables, lens = tables.cpu().numpy(), lens.cpu().numpy()
    for r, req in enumerate(batch_order):
        for layer in range(L):
            pages, live = layer_page_table_reference(rows[req], prompt[req] + decoded[req], layer, plans[req], N, bs)
            assert lens[layer, r] == live
            assert tables[layer, r, : len(pages)].tolist() == pages, (req, layer)
    assert (lens[:, len(batch_order) : R_pad] == 0).all()
    # compressed requests never read a freed block
    for req in (0, 1):
        freed = {rows[req][i] for i in plans[req].freed_block_indices}
        r = batch_order.index(req)
        for layer in range(L):
            used = tables[layer, r, : -(-lens[layer, r] // bs)] % N
            assert not freed.intersection(used.tolist())

"""LayerPageState's lazy resets: a removed or reassigned request slot reads as uncompressed again."""

import torch

from vllm_kvcomp.engine.layer_state import LayerPageState


def test_resets_zero_only_the_reset_slots_layouts():
    state = LayerPageState(num_layers=3, blocks_per_layer=8, block_size=4, max_reqs=5, width=4, device="cpu")
    layouts = state.layouts
    for offset, tensor in enumerate((layouts.compact_pages, layouts.entry_offsets, layouts.shift_pages)):
        tensor.copy_(torch.arange(tensor.numel(), dtype=torch.int32).view_as(tensor) + 1 + offset)
    before = [t.clone() for t in (layouts.compact_pages, layouts.entry_offsets, layouts.shift_pages)]
    state.reset(1)
    state.reset(4)
    state.reset(1)  # twice before a build: one reset
    assert torch.equal(layouts.compact_pages, before[0])  # lazy: nothing changes before the next build
    state.apply_resets()
    kept = [0, 2, 3, 5]  # row 5: the all-zero dummy row's slot, here poisoned and untouched too
    for tensor, old in zip((layouts.compact_pages, layouts.entry_offsets, layouts.shift_pages), before):
        assert torch.count_nonzero(tensor[[1, 4]]) == 0
        assert torch.equal(tensor[kept], old[kept])
    state.apply_resets()  # nothing pending: a no-op
    assert torch.count_nonzero(layouts.compact_pages[kept]) == layouts.compact_pages[kept].numel()

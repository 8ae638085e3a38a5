"""bench/kernels_bench.py's bookkeeping (its timings run on the GPU only)."""

import torch

from bench.kernels_bench import kept_overlap


def test_kept_overlap_is_the_share_of_kept_positions_both_selections_hold():
    fp32 = torch.tensor([[[0, 2, 5, 7], [1, 2, 3, 4]]])  # [R=1, Hkv=2, keep=4]
    fp16 = torch.tensor([[[0, 3, 5, 7], [4, 3, 2, 1]]])  # one position differs; the other row reordered
    assert kept_overlap(fp32, fp16, 8) == 7 / 8
    assert kept_overlap(fp32, fp32, 8) == 1.0

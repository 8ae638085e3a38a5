"""Observation statistics (`scoring.head_statistics`): ZigZagKV's MBA, hand-checked.

The MBA of a head is the fewest tokens holding `tau` of its attention
(docs/ZIGZAG-FAITHFULNESS.md maps it to the paper). Masses below are exact
binary fractions, so the float32 sums are exact.
"""

import pytest
import torch
from vllm_kvcomp.kernels.reference import window_scores_reference

from vllm_kvcomp.config import CompressionConfigError, build_config
from vllm_kvcomp.scoring import head_statistics, stats_for_policy

# Two heads of one request over 8 tokens:
CONCENTRATED = [0.0, 0.625, 0.0, 0.3125, 0.015625, 0.015625, 0.015625, 0.015625]  # 2 tokens hold 0.9375
SPREAD = [0.125] * 8  # 0.9 of it needs ceil(0.9 * 8) = 8 tokens; 0.75 needs 6


def mba_of(mass, lens=None, tau=0.9, **options):
    mass = torch.tensor(mass, dtype=torch.float32)
    if mass.dim() == 2:
        mass = mass[None]
    lens = torch.tensor([mass.shape[-1]] * mass.shape[0] if lens is None else lens)
    mba, _ = head_statistics(mass, lens, tau=tau, num_sinks=0, local_recent=1, **options)
    return mba.tolist()


def naive_mba(row: list[float], tau: float) -> int:
    """The definition, one token at a time: fewest tokens whose mass reaches tau of the total."""
    total, acc = sum(row), 0.0
    for count, value in enumerate(sorted(row, reverse=True), start=1):
        acc += value
        if acc >= tau * total * (1 - 1e-6):
            return count
    return len(row)


def test_concentrated_head_needs_two_tokens_spread_head_needs_all():
    assert mba_of([CONCENTRATED, SPREAD]) == [[2.0, 8.0]]
    assert mba_of([CONCENTRATED, SPREAD], tau=0.75) == [[2.0, 6.0]]
    assert mba_of([CONCENTRATED, SPREAD], tau=0.5) == [[1.0, 4.0]]


def test_sum_or_mean_over_window_queries_gives_the_same_mba():
    # A window of W queries sums W distributions: the threshold is relative, so the
    # window sum and the window mean (the paper's averaged attention) agree.
    for scale in (1.0, 32.0, 7 * 32.0):
        assert mba_of([[scale * v for v in CONCENTRATED], [scale * v for v in SPREAD]]) == [[2.0, 8.0]]


def test_window_mass_from_real_softmax_matches_the_definition():
    # Each window query's softmax over its causal keys sums to 1: the KV head's mass sums
    # to W * G, and its MBA is the naive MBA of the window-averaged distribution.
    g = torch.Generator().manual_seed(0)
    W, Hq, Hkv, D, P = 6, 4, 2, 16, 40
    queries = torch.randn(W, Hq, D, generator=g)
    keys = torch.randn(P, Hkv, D, generator=g) * 2
    _, mass = window_scores_reference(queries, keys, scale=D**-0.5, pool_kernel=1, pool_type="max", square=False)
    assert torch.allclose(mass.sum(-1), torch.full((Hkv,), float(W * Hq // Hkv)), rtol=1e-5)
    mba, _ = head_statistics(mass[None], torch.tensor([P]), tau=0.9, num_sinks=0, local_recent=1)
    averaged = (mass / (W * Hq // Hkv)).tolist()
    assert mba[0].tolist() == [float(naive_mba(row, 0.9)) for row in averaged]


def test_tokens_past_the_length_do_not_count():
    row = SPREAD[:4] + [100.0] * 4  # a second request's length 4: the tail is padding
    assert mba_of([[row]], lens=[4]) == [[4.0]]
    assert mba_of([[CONCENTRATED], [row]], lens=[8, 4]) == [[2.0], [4.0]]


@pytest.mark.parametrize("seed", range(5))
def test_default_matches_the_naive_definition(seed):
    # The default (every prompt token counted) is what `calibrate` and the engine used before:
    # the MBA of each row up to its length.
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(3, 2, 50, generator=g) ** 4
    lens = [50, 17, 1]
    mba, _ = head_statistics(mass, torch.tensor(lens), tau=0.9, num_sinks=2, local_recent=4)
    expected = [[float(naive_mba(mass[r, h, : lens[r]].tolist(), 0.9)) for h in range(2)] for r in range(3)]
    assert mba.tolist() == expected


def test_query_heads_summed_per_kv_head_is_not_the_mean_of_per_head_mbas():
    # The paper's MBA is per attention head; the engine's kernel sums the G query heads of a
    # KV head first (GQA). Two query heads attending to different tokens: per head 1 token
    # each (LMBA 1), their sum needs 2. Documented as a deviation (docs/ZIGZAG-FAITHFULNESS.md).
    head_a = [0.0, 1.0, 0.0, 0.0]
    head_b = [0.0, 0.0, 0.0, 1.0]
    assert mba_of([head_a, head_b]) == [[1.0, 1.0]]
    assert mba_of([[a + b for a, b in zip(head_a, head_b)]]) == [[2.0]]


# prefix scope: 6 prompt tokens, then a window of 4 holding 0.875 of the attention.
PREFIX = [0.1171875, 0.0078125, 0.0, 0.0, 0.0, 0.0]
WINDOW = [0.21875] * 4
ROW = PREFIX + WINDOW


def test_prefix_scope_counts_only_tokens_before_the_window():
    # Whole prompt: the 4 window tokens (0.875) + the heavy prefix token -> 5 tokens reach 0.9.
    assert mba_of([[ROW]]) == [[5.0]]
    # Prefix only (mass 0.125): its heavy token alone holds 0.1171875 >= 0.9 * 0.125 -> 1 token.
    assert mba_of([[ROW]], exclude_recent=4) == [[1.0]]


def test_prefix_scope_short_prompts_and_local_mass():
    # A prompt no longer than the window has nothing before it: MBA 0.
    assert mba_of([[ROW]], lens=[3], exclude_recent=4) == [[0.0]]
    assert mba_of([[ROW]], lens=[4], exclude_recent=4) == [[0.0]]
    assert mba_of([[ROW]], lens=[5], exclude_recent=4) == [[1.0]]
    # SimLayerKV's local mass is never affected by the MBA's scope.
    mass, lens = torch.tensor([[ROW, SPREAD + [0.0, 0.0]]]), torch.tensor([10])
    for exclude in (0, 4, 32):
        _, local = head_statistics(mass, lens, tau=0.9, num_sinks=1, local_recent=4, exclude_recent=exclude)
        assert local[0].tolist() == pytest.approx([0.1171875 + 0.875, 0.375])


def test_statistics_leave_the_callers_mass_intact():
    mass = torch.tensor([[ROW]])
    before = mass.clone()
    head_statistics(mass, torch.tensor([10]), tau=0.9, num_sinks=0, local_recent=1, exclude_recent=4)
    assert torch.equal(mass, before)


def test_stats_for_policy_reads_the_zigzag_options():
    default = stats_for_policy(build_config(method="zigzag"))
    assert default == {"tau": 0.9, "num_sinks": 4, "local_recent": 1024, "exclude_recent": 0}
    prefix = build_config(method="zigzag", overrides={"zigzag": {"mba_scope": "prefix", "tau": 0.95}})
    assert stats_for_policy(prefix) == {"tau": 0.95, "num_sinks": 4, "local_recent": 1024, "exclude_recent": 32}
    # Another server method still computes zigzag's statistics (a request may switch to zigzag).
    assert stats_for_policy(build_config(method="uniform")) == default


def test_invalid_scope_is_refused_in_one_line():
    with pytest.raises(CompressionConfigError, match=r"zigzag\.mba_scope"):
        build_config(method="zigzag", overrides={"zigzag": {"mba_scope": "last"}})

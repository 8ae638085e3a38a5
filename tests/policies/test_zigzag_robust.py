"""zigzag's robustness options (issue #13): `shrink` toward uniform, then a `floor` per layer.

Defaults keep pure Eq. 6; each case is hand-checked, then properties over random requests.
"""

import numpy as np
import pytest
from config_errors import config_error
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcomp.policies import BudgetRequest, LayerStats
from vllm_kvcomp.policies.shaping import raise_to_floor, shrink_to_average
from vllm_kvcomp.policies.zigzag import ZigZagOptions, ZigZagPolicy


def zigzag(ratio=0.2, **options):
    return ZigZagPolicy(ZigZagOptions(min_budget_ratio=ratio, **options))


def request(lmba, avg, floor=0, seq_len=1000):
    lmba = np.asarray(lmba, dtype=float)
    stats = LayerStats(mba=lmba, local_mass=np.zeros_like(lmba))
    return BudgetRequest(num_layers=len(lmba), seq_len=seq_len, avg_budget=avg, floor=floor, stats=stats)


# LMBA [1, 1, 2, 4], B_avg 100, ratio 0: Eq. 6 gives 400 * u = [50, 50, 100, 200].
LMBA = [1, 1, 2, 4]


def test_defaults_are_pure_eq6():
    assert ZigZagOptions().shrink == 1.0 and ZigZagOptions().floor == 0.0
    for lmba in (LMBA, [3.5, 0.25, 7, 1e4, 0]):
        req = request(lmba, 100)
        u = np.asarray(lmba) / np.sum(lmba)
        eq6 = 20 + 80 * len(lmba) * u
        assert np.array_equal(zigzag().raw_budgets(req), eq6)  # bit for bit
        assert np.array_equal(zigzag(shrink=1.0, floor=0.0).raw_budgets(req), eq6)


def test_shrink_blends_eq6_with_uniform():
    assert zigzag(0.0, shrink=0.5).raw_budgets(request(LMBA, 100)).tolist() == [75, 75, 100, 150]
    assert zigzag(0.0, shrink=0.25).budgets(request(LMBA, 100)).tolist() == [88, 87, 100, 125]  # 87.5: rounding
    assert zigzag(0.0, shrink=0.0).budgets(request(LMBA, 100)).tolist() == [100] * 4
    assert zigzag(0.0, shrink=1.0).budgets(request(LMBA, 100)).tolist() == [50, 50, 100, 200]


def test_floor_takes_the_deficit_from_the_layers_above_it():
    # F = 70: layers 0-1 need 2 * 20; the layers above hold 30 + 130 over F, scaled by
    # c = (400 - 4 * 70) / 160 = 0.75: [70, 70, 70 + 22.5, 70 + 97.5].
    assert zigzag(0.0, floor=0.7).raw_budgets(request(LMBA, 100)).tolist() == [70, 70, 92.5, 167.5]
    # A floor already met changes nothing; floor 1 is uniform.
    assert zigzag(0.0, floor=0.5).raw_budgets(request(LMBA, 100)).tolist() == [50, 50, 100, 200]
    assert zigzag(0.0, floor=1.0).budgets(request(LMBA, 100)).tolist() == [100] * 4


def test_shrink_then_floor():
    # shrink 0.5: [75, 75, 100, 150]; floor 0.8 (F 80): excess [0, 0, 20, 70], c = 80 / 90.
    raw = zigzag(0.0, shrink=0.5, floor=0.8).raw_budgets(request(LMBA, 100))
    assert raw == pytest.approx([80, 80, 80 + 20 * 8 / 9, 80 + 70 * 8 / 9])
    # shrink 0 makes every layer B_avg: any floor keeps it.
    assert zigzag(0.0, shrink=0.0, floor=0.9).raw_budgets(request(LMBA, 100)).tolist() == [100] * 4


def test_degenerate_statistics():
    # No statistics: uniform whatever the options.
    for options in ({}, {"shrink": 0.3}, {"floor": 0.6}, {"shrink": 0.5, "floor": 0.9}):
        assert zigzag(**options).budgets(request([0, 0, 0], 90, floor=10)).tolist() == [90, 90, 90]
    # One hot layer, ratio 0: Eq. 6 gives it everything [0, 0, 0, 400]. Floor 0.5: [50, 50, 50, 250];
    # shrink 0.5 gives the same; both together: the shrink already meets the floor.
    hot = request([0, 0, 0, 10], 100)
    assert zigzag(0.0).raw_budgets(hot).tolist() == [0, 0, 0, 400]
    assert zigzag(0.0, floor=0.5).raw_budgets(hot).tolist() == [50, 50, 50, 250]
    assert zigzag(0.0, shrink=0.5).raw_budgets(hot).tolist() == [50, 50, 50, 250]
    assert zigzag(0.0, shrink=0.5, floor=0.5).raw_budgets(hot).tolist() == [50, 50, 50, 250]
    # One layer: always B_avg.
    assert zigzag(0.0, shrink=0.3, floor=0.9).budgets(request([5], 40)).tolist() == [40]


def test_the_engine_floor_still_applies_after():
    # F = 0.5 * 100 = 50 is below the 68 always-kept tokens: allocate lifts to 68 afterwards.
    budgets = zigzag(0.0, floor=0.5).budgets(request([0, 0, 0, 10], 100, floor=68))
    assert budgets.min() >= 68 and budgets.sum() == 400


def test_helpers_keep_the_total():
    raw = np.array([10.0, 30.0, 260.0])
    assert shrink_to_average(raw, 100.0, 0.4).sum() == pytest.approx(300)
    assert raise_to_floor(raw, 100.0, 0.6).tolist() == pytest.approx([60, 60, 180])
    assert raise_to_floor(raw, 100.0, 0.0) is raw


@pytest.mark.parametrize("field,value", [("shrink", 1.5), ("shrink", -0.1), ("floor", 1.01), ("floor", -1)])
def test_bad_options_name_the_field(field, value):
    assert f"zigzag.{field}" in config_error(method="zigzag", overrides={"zigzag": {field: value}})


@st.composite
def cases(draw):
    n = draw(st.integers(1, 48))
    lmba = draw(st.lists(st.floats(0, 1e5, allow_nan=False), min_size=n, max_size=n))
    avg = draw(st.integers(1, 20_000))
    ratio, shrink, floor = (draw(st.floats(0, 1)) for _ in range(3))
    return request(lmba, avg, seq_len=40_000), ratio, shrink, floor


@settings(max_examples=400, deadline=None)
@given(cases())
def test_sum_floor_and_order_hold(case):
    req, ratio, shrink, floor = case
    policy = zigzag(ratio, shrink=shrink, floor=floor)
    raw = policy.raw_budgets(req)
    assert raw.sum() == pytest.approx(req.total, rel=1e-9)
    assert raw.min() >= floor * req.avg_budget * (1 - 1e-9)
    budgets = policy.budgets(req)
    assert budgets.sum() == req.total and budgets.min() >= int(floor * req.avg_budget * (1 - 1e-9))
    # More uncertain layers never get less (shrink and floor are monotone).
    mba = req.stats.mba
    less = mba[:, None] < mba[None, :] - 1e-6 * (1 + mba[None, :])
    assert not (less & (raw[:, None] > raw[None, :] + 1e-6 * req.avg_budget)).any()
    # Shrinking toward uniform never widens the spread of Eq. 6.
    assert np.ptp(zigzag(ratio, shrink=shrink).raw_budgets(req)) <= np.ptp(zigzag(ratio).raw_budgets(req)) + 1e-6

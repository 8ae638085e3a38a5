"""Budget policies: hand-checked maths and properties (hypothesis)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcomp.config import build_config
from vllm_kvcomp.policies import BudgetRequest, LayerStats, allocate, make_policy
from vllm_kvcomp.policies.profile import ProfileOptions, ProfilePolicy
from vllm_kvcomp.policies.pyramid import PyramidOptions, PyramidPolicy
from vllm_kvcomp.policies.simlayer import SimLayerOptions, SimLayerPolicy
from vllm_kvcomp.policies.uniform import UniformPolicy
from vllm_kvcomp.policies.zigzag import ZigZagOptions, ZigZagPolicy


def stats(mba, local=None):
    mba = np.asarray(mba, dtype=float)
    local = np.zeros_like(mba) if local is None else np.asarray(local, dtype=float)
    return LayerStats(mba=mba, local_mass=local)


def test_uniform_is_flat():
    req = BudgetRequest(num_layers=4, seq_len=1000, avg_budget=200, floor=68)
    assert UniformPolicy().budgets(req).tolist() == [200, 200, 200, 200]


def test_pyramid_matches_pyramidkv_schedule():
    # PyramidKV: min = 100/20 = 5, max = 2*100 - 5 = 195, linear over 5 layers.
    req = BudgetRequest(num_layers=5, seq_len=10_000, avg_budget=100, floor=0)
    budgets = PyramidPolicy(PyramidOptions(beta=20)).budgets(req)
    assert budgets.tolist() == [195, 148, 100, 52, 5]
    assert budgets.sum() == 500


def test_pyramid_respects_the_floor():
    req = BudgetRequest(num_layers=5, seq_len=10_000, avg_budget=100, floor=68)
    budgets = PyramidPolicy().budgets(req)
    assert budgets.min() >= 68 and budgets.sum() == 500
    assert list(budgets) == sorted(budgets, reverse=True)


def test_zigzag_eq6_hand_checked():
    # L=4, B_avg=100, B_min=0.2*100=20, LMBA = [1,1,2,4] -> u = [.125,.125,.25,.5]
    # B_l = 20 + 80*4*u = [60, 60, 100, 180]
    req = BudgetRequest(num_layers=4, seq_len=1000, avg_budget=100, floor=0, stats=stats([1, 1, 2, 4]))
    budgets = ZigZagPolicy(ZigZagOptions(tau=0.9, min_budget_ratio=0.2)).budgets(req)
    assert budgets.tolist() == [60, 60, 100, 180]


def test_zigzag_floor_applies_after_eq6():
    # B_min = 0.2 * 100 = 20 < floor 68: Eq. 6 gives [60, 60, 60, 220]; the floor then lifts
    # three layers and takes the 24 tokens from the fourth (tests/policies/test_zigzag.py).
    req = BudgetRequest(num_layers=4, seq_len=1000, avg_budget=100, floor=68, stats=stats([1, 1, 1, 5]))
    assert ZigZagPolicy().budgets(req).tolist() == [68, 68, 68, 196]


def test_zigzag_equal_uncertainty_is_uniform():
    req = BudgetRequest(num_layers=3, seq_len=1000, avg_budget=90, floor=10, stats=stats([5, 5, 5]))
    assert ZigZagPolicy().budgets(req).tolist() == [90, 90, 90]


def test_zigzag_caps_at_prompt_and_redistributes():
    # Layer 0 would get 20 + 80*2*0.9 = 164 > seq_len 150: capped, rest spread.
    req = BudgetRequest(num_layers=2, seq_len=150, avg_budget=100, floor=0, stats=stats([9, 1]))
    budgets = ZigZagPolicy().budgets(req)
    assert budgets.tolist() == [150, 50]


def test_simlayer_lazy_layers_keep_sinks_and_recent():
    opts = SimLayerOptions(threshold=0.9, recent=60)
    req = BudgetRequest(
        num_layers=4,
        seq_len=10_000,
        avg_budget=1000,
        floor=68,
        stats=stats([1, 1, 1, 1], local=[0.95, 0.5, 0.99, 0.1]),
    )
    policy = SimLayerPolicy(opts, num_sinks=4)
    assert policy.lazy_layers(req).tolist() == [True, False, True, False]
    # lazy: 4 + 60 = 64 -> raised to the floor 68; the rest share 4000 - 136.
    assert policy.budgets(req).tolist() == [68, 1932, 68, 1932]


def test_policy_needs_stats():
    req = BudgetRequest(num_layers=2, seq_len=100, avg_budget=50, floor=0)
    with pytest.raises(ValueError, match="statistics"):
        ZigZagPolicy().budgets(req)


def test_make_policy_per_method():
    assert isinstance(make_policy(build_config(method="zigzag")), ZigZagPolicy)
    assert isinstance(make_policy(build_config(method="simlayer")), SimLayerPolicy)
    profile = build_config(method="profile", overrides={"profile": {"layer_weights": [1.0, 2.0]}})
    assert isinstance(make_policy(profile), ProfilePolicy)
    with pytest.raises(ValueError):
        make_policy(build_config(method="none"))


@st.composite
def budget_requests(draw):
    num_layers = draw(st.integers(1, 48))
    seq_len = draw(st.integers(1, 40_000))
    floor = draw(st.integers(0, seq_len))
    avg = draw(st.integers(floor, seq_len))
    mba = draw(st.lists(st.floats(0, 1e5, allow_nan=False), min_size=num_layers, max_size=num_layers))
    local = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=num_layers, max_size=num_layers))
    return BudgetRequest(num_layers=num_layers, seq_len=seq_len, avg_budget=avg, floor=floor, stats=stats(mba, local))


POLICIES = [
    UniformPolicy(),
    PyramidPolicy(),
    ZigZagPolicy(),
    ZigZagPolicy(ZigZagOptions(min_budget_ratio=0.0)),  # Eq. 6 without a bound: raw budgets down to 0
    SimLayerPolicy(SimLayerOptions(recent=256)),
]


def assert_budget_invariants(policy, req):
    budgets = policy.budgets(req)
    assert budgets.dtype == np.int64 and budgets.shape == (req.num_layers,)
    assert budgets.sum() == req.total
    assert budgets.min() >= req.floor
    assert budgets.max() <= req.seq_len
    assert np.array_equal(budgets, policy.budgets(req))  # deterministic


@settings(max_examples=300, deadline=None)
@given(budget_requests(), st.sampled_from(range(len(POLICIES))))
def test_budget_invariants(req, which):
    assert_budget_invariants(POLICIES[which], req)


@settings(max_examples=300, deadline=None)
@given(budget_requests(), st.floats(0, 1), st.data())
def test_profile_budget_invariants(req, min_budget_ratio, data):
    # A static profile (one weight per layer, >= 0, not all 0) obeys the same invariants.
    weights = data.draw(
        st.lists(st.floats(0, 1e5, allow_nan=False), min_size=req.num_layers, max_size=req.num_layers).filter(
            lambda w: sum(w) > 0
        )
    )
    assert_budget_invariants(
        ProfilePolicy(ProfileOptions(layer_weights=weights, min_budget_ratio=min_budget_ratio)), req
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e6, allow_nan=False), min_size=1, max_size=64),
    st.integers(0, 500),
    st.integers(0, 5000),
    st.data(),
)
def test_allocate_projection(raw, lo, span, data):
    hi = lo + span
    n = len(raw)
    total = data.draw(st.integers(n * lo, n * hi))
    out = allocate(np.array(raw), total, lo, hi)
    assert out.sum() == total and out.min() >= lo and out.max() <= hi


@settings(max_examples=400, deadline=None)
@given(st.lists(st.floats(0, 5000), min_size=2, max_size=12), st.integers(0, 100), st.integers(0, 3000), st.data())
def test_allocate_never_inverts_two_layers(raw, lo, span, data):
    hi = lo + span
    total = data.draw(st.integers(len(raw) * lo, len(raw) * hi))
    out = allocate(np.array(raw), total, lo, hi)
    r = np.array(raw)
    smaller = r[:, None] < r[None, :] - 1e-6 * (1 + r[None, :])  # differences that survive float rounding
    inverted = smaller & (out[:, None] > out[None, :])  # a smaller raw budget got more
    assert not inverted.any(), (raw, lo, hi, total, out.tolist())


def test_allocate_shrinks_a_capped_layer_no_further_than_the_others():
    # was [1, 0]: the layer capped at hi lost the whole difference in proportion to its raw weight
    assert allocate(np.array([1.0, 200.0]), 1, 0, 100).tolist() == [0, 1]


def test_allocate_keeps_shape_when_feasible():
    raw = np.array([10.0, 20.0, 30.0, 40.0])
    assert allocate(raw, 100, 0, 100).tolist() == [10, 20, 30, 40]
    with pytest.raises(ValueError, match="infeasible"):
        allocate(raw, 1000, 0, 100)

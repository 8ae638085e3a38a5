"""bench.decode_budget_drift: how far ZigZagKV's layer budgets move between the prefill and the decode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.decode_budget_drift import eq6_budgets, main, moved_share, spearman

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_moved_share_is_zero_for_equal_weights_and_counts_each_token_once():
    w = np.array([0.5, 1.5, 1.0, 1.0])
    assert moved_share(w, w) == 0.0
    swapped = np.array([1.5, 0.5, 1.0, 1.0])
    budgets = eq6_budgets(w)
    # layer 0 gains what layer 1 loses: that amount, once, over the total
    assert moved_share(w, swapped) == pytest.approx(abs(budgets[0] - budgets[1]) / budgets.sum())
    assert moved_share(np.ones(4), np.array([4.0, 0, 0, 0])) < 1.0
    distinct = np.array([0.5, 1.5, 1.2, 0.8])
    assert spearman(distinct, distinct) == pytest.approx(1.0) and spearman(distinct, -distinct) == pytest.approx(-1.0)


def test_measures_prefill_and_decode_weights_on_a_real_transformers_model(tiny_model, tmp_path):
    rc = main(["--model", tiny_model, "--prompts", "2", "--items", "5", "--checkpoints", "4,8",
               "--window", "8", "--decode-window", "4", "--threads", "1", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    record = json.loads((tmp_path / "decode_budget_drift.json").read_text())
    assert record["commit"] and record["budget_tokens"] == 1024
    (model,) = record["models"]
    assert len(model["prompts"]) == 2 and len(model["prefill_across_prompts_moved_share"]) == 1
    for prompt in model["prompts"]:
        assert set(prompt["weights"]) == {"prefill", "decode@4", "decode@8"}
        for weights in prompt["weights"].values():
            assert np.mean(weights) == pytest.approx(1.0, abs=1e-3)  # u_l scaled to mean 1
        assert [(p["a"], p["b"]) for p in prompt["pairs"]] == [
            ("prefill", "decode@4"), ("prefill", "decode@8"), ("decode@4", "decode@8")
        ]  # fmt: skip
        assert all(0.0 <= p["moved_share"] < 1.0 for p in prompt["pairs"])

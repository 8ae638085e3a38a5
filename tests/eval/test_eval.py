"""The evaluation harness (evaluation/): tasks, scoring, statistics, and masked eviction == removal (CPU)."""

import numpy as np
import pytest
import torch

from evaluation.report import aggregate, bootstrap_ci, overall, paired_delta_ci
from vllm_kvcomp.calibration_data import TASKS, TaskGenerator
from vllm_kvcomp.config import build_config

transformers = pytest.importorskip("transformers")  # fixtures (tiny_model, fake_vllm): conftest.py


class WordTokenizer:
    """Whitespace tokenizer, enough to size documents without a real vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_deterministic_sized_and_answerable(task):
    gen = TaskGenerator(WordTokenizer(), seed=3)
    a, b = gen.sample(task, 2000, 0.5), gen.sample(task, 2000, 0.5)
    assert a == b
    assert gen.sample(task, 2000, 0.5, index=1).answers != a.answers
    words = len(a.document.split())
    assert 1700 <= words <= 2100
    for answer in a.answers:
        assert answer in a.document
    assert a.score(" ".join(a.answers)) == 1.0 and a.score("nothing") == 0.0
    if task == "vt":
        assert a.score(a.answers[0]) == 1 / len(a.answers)


def test_needle_depth_is_honoured():
    gen = TaskGenerator(WordTokenizer())
    for depth in (0.1, 0.9):
        s = gen.sample("niah_noise", 3000, depth)
        pos = s.document.index(s.answers[0]) / len(s.document)
        assert abs(pos - depth) < 0.05


def test_bootstrap_and_paired_delta():
    lo, hi = bootstrap_ci([1, 1, 1, 1])
    assert lo == hi == 1.0
    lo, hi = bootstrap_ci([0, 1] * 50)
    assert 0.38 < lo < 0.5 < hi < 0.62
    d, lo, hi = paired_delta_ci([1, 1, 0, 1], [0, 1, 0, 0])
    assert d == 0.5 and lo <= d <= hi


def test_aggregate_reports_full_score_beside_each_method():
    rows = []
    for i in range(4):
        for method, budget, score in (("none", 1.0, 1.0), ("uniform", 0.25, i % 2), ("zigzag", 0.25, 1.0)):
            rows.append(
                dict(
                    method=method,
                    budget=budget,
                    task="t",
                    context_len=4096,
                    protocol="aware",
                    depth=i / 4,
                    score=score,
                    kept_fraction=budget,
                )
            )
    table = {(r["method"], r["budget"]): r for r in aggregate(rows)}
    assert table[("uniform", 0.25)]["score"] == 0.5 and table[("uniform", 0.25)]["full_score"] == 1.0
    summary = overall(rows, "aware")
    assert summary[("zigzag", 0.25)]["delta_vs_uniform"][0] == 0.5


def test_masked_eviction_equals_removing_the_tokens(tiny_model):
    """What the CPU eval does (mask) is what the engine does (remove and compact)."""
    from transformers import DynamicCache

    from evaluation.hf_backend import HFEvaluator

    ev = HFEvaluator(tiny_model, threads=1)
    config = build_config(
        method="zigzag", budget="0.3", overrides={"window": 8, "num_recent": 16, "metrics_port": None}
    )
    text = " ".join(f"w{(i * 37) % 997}" for i in range(300))
    cache, pre = ev.prefill(text, config)
    masks, kept = ev.eviction_masks(pre, config)
    assert masks and 0.25 < kept < 0.45
    for evicted in masks.values():
        counts = (~evicted).sum(1)
        assert (counts == counts[0]).all(), "every KV head of a layer keeps the same count"
        assert not evicted[:, :4].any() and not evicted[:, -16:].any(), "sinks and recent kept"
    token = torch.tensor([[123]])
    from evaluation.hf_backend import STATE

    with torch.inference_mode():
        STATE.evicted = masks
        masked = ev.model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
        STATE.evicted = {}
        cache.crop(-1)
        removed_cache = DynamicCache()
        for layer in range(ev.num_layers):
            k, v = cache.layers[layer].keys, cache.layers[layer].values
            if layer in masks:
                idx = torch.stack([torch.nonzero(~m).squeeze(1) for m in masks[layer]])  # [Hkv, kept]
                gather = idx[None, :, :, None].expand(1, -1, -1, k.shape[-1])
                k, v = k.gather(2, gather), v.gather(2, gather)
            removed_cache.update(k, v, layer)
        position = torch.tensor([[pre.prompt_len]])
        removed = ev.model(
            input_ids=token,
            past_key_values=removed_cache,
            position_ids=position,
            cache_position=torch.tensor([pre.prompt_len]),
            use_cache=True,
        ).logits[0, -1]
    assert torch.allclose(masked.float(), removed.float(), atol=2e-2, rtol=2e-2)
    assert not torch.allclose(
        masked.float(), ev.model(input_ids=token, past_key_values=cache).logits[0, -1].float(), atol=1e-3
    )


def test_full_kv_answer_matches_generate(tiny_model):
    from evaluation.hf_backend import HFEvaluator

    ev = HFEvaluator(tiny_model, threads=1)
    config = build_config(method="uniform", overrides={"metrics_port": None})
    head, question = "w1 w2 w3 " * 40, "w7 w8 w9"
    ids = ev._ids(head + question)
    with torch.inference_mode():
        expect = ev.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    cache, pre = ev.prefill(head, config)
    got = ev.answer(cache, pre, question, {}, 6, first_from_prefill=False)
    assert got == ev.tokenizer.decode(expect, skip_special_tokens=True)
    assert cache.get_seq_length() == pre.prompt_len  # cropped back for the next configuration


def test_eval_command_writes_table_json_and_plots(tiny_model, tmp_path):
    """`python -m evaluation --backend hf` end to end on a tiny model: issue #5's result schema."""
    import json

    from evaluation.__main__ import main

    rc = main(
        [
            "--backend",
            "hf",
            "--model",
            tiny_model,
            "--tasks",
            "niah_noise",
            "--lengths",
            "192",
            "--depths",
            "0.2,0.8",
            "--methods",
            "uniform,zigzag",
            "--budgets",
            "0.5",
            "--protocols",
            "aware",
            "--max-new-tokens",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
            "--name",
            "q",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "q.json").read_text())
    assert {r["method"] for r in data["results"]} == {"none", "uniform", "zigzag"}
    for entry in data["results"]:
        assert {"method", "budget", "task", "context_len", "protocol", "score", "full_score", "ci95"} <= set(entry)
        assert entry["full_score"] is not None
    assert len(data["rows"]) == 2 * 3  # 2 samples x (none + 2 methods)
    # evidence: what measured the rows, at which commit
    assert data["command"].startswith("vllm-kvcomp eval") or "--backend hf" in data["command"]
    assert data["commit"] and data["versions"]["torch"] and data["runs"][-1]["commit"] == data["commit"]
    assert {r["sample"] for r in data["rows"]} == {0}
    for png in ("q_aware.png", "q_aware_heatmap.png"):
        assert (tmp_path / png).stat().st_size > 5000
    assert "| zigzag | 0.5 |" in (tmp_path / "q.md").read_text()


def test_vllm_backend_refuses_the_agnostic_protocol(capsys):
    from evaluation.__main__ import main

    assert main(["--backend", "vllm", "--model", "x", "--protocols", "agnostic,aware"]) == 2
    assert "query-aware protocol only" in capsys.readouterr().err


def test_heatmap_cells_are_the_mean_score(tmp_path, monkeypatch):
    """The heatmap grid is the mean score per (depth, length) of each method and budget."""
    from evaluation import plots

    rows = [
        dict(method=m, budget=b, task=t, context_len=n, depth=d, protocol="aware", score=s)
        for m, b, s in (("none", 1.0, 1.0), ("zigzag", 0.2, 0.0))
        for t in ("a", "b")
        for n in (4096, 8192)
        for d in (0.1, 0.9)
    ]
    rows.append(dict(method="zigzag", budget=0.2, task="c", context_len=4096, depth=0.1, protocol="aware", score=1.0))
    grids = {}
    import matplotlib.axes

    original = matplotlib.axes.Axes.imshow

    def capture(self, grid, *args, **kwargs):
        grids[self.get_title() or len(grids)] = np.array(grid)
        return original(self, grid, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", capture)
    plots.plot_needle_heatmaps(rows, "aware", tmp_path / "h.png")
    assert (tmp_path / "h.png").exists()
    (full, zig) = grids.values()
    assert np.allclose(full, 1.0)
    assert zig[0, 0] == pytest.approx(1 / 3) and zig[1, 1] == 0.0


def test_vllm_backend_sends_every_config_as_a_per_request_override(tiny_model, tmp_path, fake_vllm):
    """`python -m evaluation --backend vllm` with the engine faked: one request per (sample, config),
    the method/budget in SamplingParams.extra_args, rows scored against the answers."""
    import json

    from evaluation.__main__ import main

    rc = main(
        [
            "--backend",
            "vllm",
            "--model",
            tiny_model,
            "--tasks",
            "niah_noise,vt",
            "--lengths",
            "192",
            "--depths",
            "0.5",
            "--methods",
            "uniform,zigzag",
            "--budgets",
            "0.5,0.1",
            "--protocols",
            "aware",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    seen = fake_vllm
    assert seen["kwargs"]["additional_config"]["kv_compression"]["method"] == "uniform"
    assert seen["kwargs"]["enable_prefix_caching"] is False
    assert seen["kwargs"]["gpu_memory_utilization"] == 0.45
    extras = [p.extra_args for call in seen["calls"] for _, p in call]
    assert len(extras) == 2 * 5  # 2 samples x (none + 2 methods x 2 budgets)
    assert {"kv_compression": "none"} in extras and {"kv_compression": "zigzag", "kv_budget": 0.1} in extras
    data = json.loads((tmp_path / "quality.json").read_text())
    scores = {(r["method"], r["budget"], r["task"]): r["score"] for r in data["results"]}
    assert scores[("none", 1.0, "vt")] == 1.0 and scores[("zigzag", 0.5, "niah_noise")] == 1.0
    assert scores[("uniform", 0.1, "vt")] == 0.0
    assert all(r["full_score"] == 1.0 for r in data["results"])
    assert (tmp_path / "quality_aware_heatmap.png").exists()


def test_cpu_path_shares_scores_within_layer_groups(tiny_model):
    """`layer_share` on the CPU path as in the engine: a group's layers keep the same tokens."""
    from evaluation.hf_backend import HFEvaluator

    ev = HFEvaluator(tiny_model, threads=1)
    text = " ".join(f"w{(i * 37) % 997}" for i in range(300))
    options = {"window": 8, "num_recent": 16, "metrics_port": None}
    own = build_config(method="uniform", budget="0.3", overrides=options)
    shared = build_config(method="uniform", budget="0.3", overrides={**options, "layer_share": 64})
    _, pre = ev.prefill(text, own)
    own_masks, _ = ev.eviction_masks(pre, own)
    shared_masks, _ = ev.eviction_masks(pre, shared)
    assert len(shared_masks) > 1 and all(torch.equal(m, shared_masks[0]) for m in shared_masks.values())
    assert torch.equal(shared_masks[0], own_masks[0])
    assert any(not torch.equal(m, own_masks[0]) for m in own_masks.values())

"""`vllm-kvcomp calibrate` and the static per-layer "profile" method (CPU)."""

import textwrap

import numpy as np
import pytest
import torch
import yaml
from config_errors import config_error

from vllm_kvcomp.config import CompressionConfigError, build_config, packaged_defaults
from vllm_kvcomp.policies import BudgetRequest, make_policy
from vllm_kvcomp.policies.profile import ProfileOptions, ProfilePolicy

transformers = pytest.importorskip("transformers")

from tiny_llama import build_tiny_llama  # noqa: E402

NUM_LAYERS = 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 3-layer random Llama + word tokenizer (tests/conftest.py, as the evaluation tests build it)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=NUM_LAYERS)


def profile_config(weights, **profile):
    return build_config(method="profile", overrides={"profile": {"layer_weights": weights, **profile}})


# --- the policy ---------------------------------------------------------------------------


def test_profile_budgets_hand_checked():
    # w = [.5, .25, .25], L=3, B_avg=100, B_min = 0.2*100 = 20:
    # B_l = 20 + 80 * 3 * w = [140, 80, 80] (sum 300 = L * B_avg)
    policy = make_policy(profile_config([0.5, 0.25, 0.25]))
    assert isinstance(policy, ProfilePolicy)
    req = BudgetRequest(num_layers=3, seq_len=1000, avg_budget=100, floor=0)
    assert policy.budgets(req).tolist() == [140, 80, 80]


def test_profile_weights_are_relative():
    # Mean-1 weights (what calibrate writes) give the same budgets as sum-1 weights.
    req = BudgetRequest(num_layers=3, seq_len=1000, avg_budget=100, floor=0)
    assert make_policy(profile_config([1.5, 0.75, 0.75])).budgets(req).tolist() == [140, 80, 80]


def test_profile_floor_raises_b_min_and_prompt_caps():
    # floor 50 > 0.2 * 100: B_min = 50, B_l = 50 + 50 * 3 * w = [125, 87.5, 87.5];
    # largest remainder, ties to the lower layer: [125, 88, 87].
    policy = make_policy(profile_config([0.5, 0.25, 0.25]))
    req = BudgetRequest(num_layers=3, seq_len=1000, avg_budget=100, floor=50)
    assert policy.budgets(req).tolist() == [125, 88, 87]
    # min_budget_ratio 0: B_l = 300 * w = [150, 75, 75]; a 120-token prompt caps layer 0.
    policy = make_policy(profile_config([0.5, 0.25, 0.25], min_budget_ratio=0.0))
    assert policy.budgets(BudgetRequest(num_layers=3, seq_len=1000, avg_budget=100, floor=0)).tolist() == [150, 75, 75]
    capped = policy.budgets(BudgetRequest(num_layers=3, seq_len=120, avg_budget=100, floor=0))
    assert capped[0] == 120 and capped.sum() == 300 and capped[1] == capped[2] == 90


def test_profile_equal_weights_are_uniform():
    policy = make_policy(profile_config([2.0] * 4))
    assert policy.budgets(BudgetRequest(num_layers=4, seq_len=500, avg_budget=90, floor=10)).tolist() == [90] * 4


def test_profile_for_another_model_is_refused():
    policy = make_policy(profile_config([0.5, 0.25, 0.25], model="tiny-3"))
    req = BudgetRequest(num_layers=24, seq_len=1000, avg_budget=100, floor=0)
    with pytest.raises(CompressionConfigError) as info:
        policy.budgets(req)
    message = str(info.value)
    assert "calibrated for 3 layers (tiny-3) and the model has 24" in message
    assert "profile.layer_weights" in message and "vllm-kvcomp calibrate" in message and "\n" not in message


def test_engine_startup_refuses_a_profile_of_another_depth():
    from test_cli import fake_vllm_config

    from vllm_kvcomp.engine.requirements import check_vllm_config

    vllm_config = fake_vllm_config(get_total_num_hidden_layers=lambda: 24)
    check_vllm_config(vllm_config, profile_config([1.0] * 24))
    with pytest.raises(CompressionConfigError, match="calibrated for 3 layers and the model has 24"):
        check_vllm_config(vllm_config, profile_config([0.5, 0.25, 0.25]))


# --- the config -------------------------------------------------------------------------


def test_profile_without_weights_is_refused():
    msg = config_error(method="profile")
    assert "profile.layer_weights" in msg and "vllm-kvcomp calibrate" in msg
    assert packaged_defaults("profile")["profile"]["layer_weights"] is None
    assert packaged_defaults("profile")["method"] == "profile"


def test_per_request_profile_needs_a_calibrated_server():
    from vllm_kvcomp.config import request_config

    with pytest.raises(CompressionConfigError, match="profile.layer_weights"):
        request_config(build_config(method="zigzag"), {"kv_compression": "profile"})
    server = build_config(method="zigzag", overrides={"profile": {"layer_weights": [1, 2, 3]}})
    assert request_config(server, {"kv_compression": "profile"}).profile.layer_weights == [1, 2, 3]


@pytest.mark.parametrize(
    "weights, needle",
    [
        ([], "empty"),
        ([1.0, -0.5], ">= 0"),
        ([0.0, 0.0], "> 0"),
        ([1.0, float("nan")], "finite"),
        ("heavy", "profile.layer_weights"),
    ],
)
def test_bad_weights_name_the_field(weights, needle):
    msg = config_error(method="profile", overrides={"profile": {"layer_weights": weights}})
    assert "profile.layer_weights" in msg and needle in msg


def test_bad_profile_options_name_the_field():
    assert "profile.min_budget_ratio" in config_error(
        method="profile", overrides={"profile": {"layer_weights": [1.0], "min_budget_ratio": 1.5}}
    )
    assert "profile.typo" in config_error(method="profile", overrides={"profile": {"layer_weights": [1.0], "typo": 1}})


def test_profile_yaml_loads(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        textwrap.dedent("""
        method: profile
        budget: 0.3
        profile:
          layer_weights: [1.2, 0.8]
          model: m
    """)
    )
    config = build_config(config_path=path)
    assert (config.method, config.budget, config.profile.layer_weights) == ("profile", 0.3, [1.2, 0.8])
    assert config.profile.min_budget_ratio == 0.2  # packaged default
    assert config.profile.normalized_weights() == pytest.approx([0.6, 0.4])


def test_kv_compression_profile_flag_without_a_profile_says_to_calibrate(capsys):
    from vllm_kvcomp.cli import main

    assert main(["check-config", "--kv-compression", "profile"]) == 2
    err = capsys.readouterr().err.strip()
    assert "vllm-kvcomp calibrate" in err and "\n" not in err


# --- the calibration -------------------------------------------------------------------


def test_normalization_is_zigzags():
    from vllm_kvcomp.calibrate import Calibration, normalized_weights

    assert normalized_weights(np.array([1.0, 1.0, 2.0, 4.0])).tolist() == [0.5, 0.5, 1.0, 2.0]
    cal = Calibration("m", np.array([[0.5, 0.5, 2.0], [1.5, 0.5, 1.0]]))
    assert cal.weights.tolist() == [1.0, 0.5, 1.5]
    assert cal.stddev == pytest.approx([np.sqrt(0.5), 0.0, np.sqrt(0.5)])
    # each sample moves |0.5-1| + |2-1.5| = 1 of L=3 weight units off the profile: half of 1/3
    assert cal.budget_moved == pytest.approx(1 / 6)
    # the profile [1, .5, 1.5] vs uniform: (0 + .5 + .5) / 3 / 2
    assert cal.uniform_moved == pytest.approx(1 / 6)
    assert cal.verdict().startswith("moderately stable")
    assert Calibration("m", np.array([[1.0, 1.0, 1.0], [1.1, 0.9, 1.0]])).verdict().startswith("stable")
    assert Calibration("m", np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])).verdict().startswith("varies a lot")
    assert "one sample only" in Calibration("m", np.array([[3.0, 0.0, 0.0]])).verdict()


def test_per_task_stability():
    from vllm_kvcomp.calibrate import Calibration

    # two workloads, each perfectly stable, with different profiles
    rows = np.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    cal = Calibration("m", rows, [100] * 4, ["a", "a", "b", "b"])
    assert cal.weights.tolist() == [1.0, 1.0, 1.0]
    assert cal.by_task() == {"a": (2, 0.0, pytest.approx(1 / 3)), "b": (2, 0.0, pytest.approx(1 / 3))}
    from vllm_kvcomp.calibrate import render_profile

    text = render_profile(cal, source="vllm-kvcomp calibrate m")
    assert (
        "# Task a (2 samples): zigzag would move 0.0% within the task; its own profile is 33.3% from this one." in text
    )
    assert yaml.safe_load(text)["profile"]["layer_weights"] == [1.0, 1.0, 1.0]


def test_layer_uncertainty_is_the_mba_mean_over_heads():
    from vllm_kvcomp.calibrate import layer_statistics

    # head 0: all mass on one token (MBA 1); head 1: spread over 4 tokens (MBA ceil(0.9*4) = 4)
    mass = torch.tensor([[0.0, 8.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert layer_statistics([mass, mass[[1, 1]]], 4, tau=0.9, num_sinks=0, recent=1).mba.tolist() == [2.5, 4.0]


def test_calibrate_command_writes_a_loadable_profile(tiny_model, tmp_path, capsys):
    from vllm_kvcomp.cli import main

    out = tmp_path / "profiles" / "tiny.yaml"
    argv = [
        "calibrate",
        tiny_model,
        "--lengths",
        "300",
        "--samples",
        "3",
        "--tasks",
        "niah_noise,vt",
        "--window",
        "8",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    data = yaml.safe_load(text)
    weights = data["profile"]["layer_weights"]
    assert data["method"] == "profile" and data["budget"] == 0.2
    assert len(weights) == NUM_LAYERS and all(w >= 0 for w in weights)
    assert np.mean(weights) == pytest.approx(1.0, abs=1e-3)  # documented: mean 1.0
    assert len(set(weights)) > 1, "a random model's layers do not all look alike"
    assert data["profile"]["min_budget_ratio"] == 0.2
    assert data["profile"]["model"] == "tiny" or data["profile"]["model"].startswith("tiny")
    assert data["profile"]["source"].startswith("vllm-kvcomp calibrate ") and "--samples 3" in data["profile"]["source"]
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("Stddev of each weight across samples" in line for line in header)
    assert any("Spread: min" in line for line in header)
    config = build_config(config_path=out)
    assert config.method == "profile" and config.profile.layer_weights == weights
    budgets = make_policy(config).budgets(BudgetRequest(num_layers=NUM_LAYERS, seq_len=300, avg_budget=100, floor=0))
    assert budgets.sum() == 300
    assert main(["check-config", str(out)]) == 0
    assert "method: profile" in capsys.readouterr().out


def test_calibrate_on_your_own_prompts(tiny_model, tmp_path, capsys):
    import json

    from vllm_kvcomp.cli import main

    prompts = tmp_path / "workload.jsonl"
    words = lambda k: " ".join(f"w{(i * k) % 997}" for i in range(200))  # noqa: E731
    prompts.write_text(
        "\n".join(
            [
                json.dumps({"prompt": words(37), "task": "code"}),
                "",
                json.dumps({"messages": [{"role": "user", "content": words(11)}]}),
                json.dumps({"prompt": words(53), "task": "code"}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "own.yaml"
    assert (
        main(["calibrate", tiny_model, "--prompts", str(prompts), "--window", "8", "--threads", "1", "--out", str(out)])
        == 0
    )
    text = out.read_text()
    assert "3 sample prompt(s) (code, workload;" in text
    assert "# Task code (2 samples)" in text and "# Task workload (1 samples)" in text
    assert len(build_config(config_path=out).profile.layer_weights) == NUM_LAYERS
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    assert main(["calibrate", tiny_model, "--prompts", str(bad), "--out", str(tmp_path / "x.yaml")]) == 2
    assert 'bad.jsonl:1: expected an object with "prompt" or "messages"' in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_calibrate_refuses_bad_arguments_before_loading(tmp_path, capsys):
    from vllm_kvcomp.cli import main

    assert main(["calibrate", str(tmp_path), "--tasks", "bogus"]) == 2
    assert "unknown task 'bogus'" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["calibrate", str(tmp_path), "--budget", "1.5"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path), "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_default_output_is_configs_profiles(tiny_model, tmp_path, monkeypatch):
    from vllm_kvcomp import calibrate
    from vllm_kvcomp.cli import main

    monkeypatch.chdir(tmp_path)
    fake = calibrate.Calibration("x", np.ones((1, NUM_LAYERS)), [300], ["niah_noise"], 0.0)
    monkeypatch.setattr(calibrate, "calibrate", lambda *a, **k: fake)
    assert main(["calibrate", tiny_model, "--model-name", "my-model"]) == 0
    path = tmp_path / "configs" / "profiles" / "my-model.yaml"
    assert build_config(config_path=path).profile.layer_weights == [1.0] * NUM_LAYERS


def test_packaged_profile_options_match_the_model():
    assert ProfileOptions().min_budget_ratio == packaged_defaults("profile")["profile"]["min_budget_ratio"]
    config = profile_config([1.0, 2.0])  # configs/profile.yaml + weights: the shared documented defaults
    assert (config.budget, config.window, config.pool_kernel, config.num_sinks, config.num_recent) == (
        0.2,
        32,
        7,
        4,
        64,
    )


# --- a per-model SimLayerKV threshold (vllm_kvcomp/lazy_layers.py) ---------------------


def test_local_mass_is_the_share_on_sinks_and_recent_tokens():
    from vllm_kvcomp.calibrate import layer_statistics

    # 1 sink + the last 2 of 8 tokens: head 0 puts 1 + 1 + 3 of 10 there, head 1 all of it.
    head0 = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0])
    head1 = torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    stats = layer_statistics([torch.stack([head0, head1])], 8, tau=0.9, num_sinks=1, recent=2)
    assert stats.local_mass.tolist() == [0.75]


def test_suggested_threshold_marks_the_layers_clearly_above_the_rest():
    from vllm_kvcomp.lazy_layers import suggest_threshold

    # layers 1 and 4 near 0.95, the rest 0.3-0.5: the largest drop (0.92 -> 0.5) is in the top half.
    rows = np.array([[0.3, 0.96, 0.4, 0.5, 0.94, 0.35], [0.32, 0.94, 0.42, 0.5, 0.9, 0.33]])
    found = suggest_threshold(rows)
    assert found.lazy_layers == [1, 4] and found.threshold == pytest.approx((0.92 + 0.5) / 2)
    assert found.gap == pytest.approx(0.42) and found.agreement == 1.0
    # one prompt where layer 3 crosses the threshold: 1 of 12 (prompt, layer) pairs disagrees
    rows[1, 3] = 0.8
    assert suggest_threshold(rows).agreement == pytest.approx(11 / 12)
    # a continuum (drops < 0.1), more than half the layers apart, or one layer: nothing suggested
    assert suggest_threshold(np.array([[0.9, 0.85, 0.8, 0.75, 0.7]])).threshold is None
    assert suggest_threshold(np.array([[0.95, 0.95, 0.95, 0.2]])).threshold is None
    assert suggest_threshold(np.array([[0.95]])).threshold is None


def test_render_says_why_when_nothing_is_suggested():
    from vllm_kvcomp.lazy_layers import render

    header, yaml_lines = render(np.ones((2, 3)), recent=1024, num_sinks=4)
    assert "every token is local" in header[-1] and yaml_lines == []
    header, yaml_lines = render(np.array([[0.5, 0.52, 0.49]]), recent=1024, num_sinks=4)
    assert "no layer stands apart" in header[-1] and yaml_lines == []
    header, yaml_lines = render(np.array([[0.5, 0.95, 0.49]]), recent=64, num_sinks=4)
    assert "suggested simlayer.threshold 0.725" in header[-1] and "lazy layers [1]" in header[-1]
    assert yaml.safe_load("\n".join(yaml_lines)) == {"simlayer": {"threshold": 0.725, "recent": 64}}
    assert render(None, 1024, 4) == ([], [])


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """The tiny Llama with layer 1 made local: constant q and k (biases only), so after RoPE
    every query attends to itself and its nearest neighbours (SimLayerKV's lazy layer)."""

    def make_layer_one_local(model):
        for proj in (model.model.layers[1].self_attn.q_proj, model.model.layers[1].self_attn.k_proj):
            proj.weight.zero_()
            proj.bias.fill_(3.0)

    return build_tiny_llama(
        tmp_path_factory.mktemp("local"), edit=make_layer_one_local, num_hidden_layers=NUM_LAYERS, attention_bias=True
    )


def test_calibrate_suggests_a_simlayer_threshold(local_model, tiny_model, tmp_path):
    from vllm_kvcomp.cli import main
    from vllm_kvcomp.config import request_config
    from vllm_kvcomp.policies import LayerStats

    common = ["--lengths", "300", "--samples", "2", "--window", "8", "--threads", "1"]
    out = tmp_path / "local.yaml"
    assert main(["calibrate", local_model, *common, "--simlayer-recent", "64", "--out", str(out)]) == 0
    text = out.read_text()
    assert "# SimLayerKV: suggested simlayer.threshold" in text and "lazy layers [1];" in text
    server = build_config(config_path=out)
    threshold = server.simlayer.threshold
    assert 0.3 < threshold < 0.95 and server.simlayer.recent == 64
    # a request for simlayer on this server marks layer 1 lazy from stats like the calibration's
    config = request_config(server, {"kv_compression": "simlayer"})
    policy = make_policy(config)
    stats = LayerStats(mba=np.ones(NUM_LAYERS), local_mass=np.array([0.2, 0.99, 0.2]))
    assert policy.lazy_layers(BudgetRequest(NUM_LAYERS, 4000, 800, 68, stats)).tolist() == [False, True, False]
    # the random model: no layer stands apart; with the default recent (1024) every token of
    # a 300-token prompt is local. Neither writes a simlayer section (the server's 0.9 stays).
    for extra, needle in (["--simlayer-recent", "64"], "no layer stands apart"), ([], "every token is local"):
        out = tmp_path / "tiny.yaml"
        assert main(["calibrate", tiny_model, *common, *extra, "--out", str(out)]) == 0
        assert needle in out.read_text() and "simlayer" not in yaml.safe_load(out.read_text())
        assert build_config(config_path=out).simlayer.threshold == 0.9

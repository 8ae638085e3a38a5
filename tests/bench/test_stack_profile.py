"""bench.stack_profile: py-spy's raw stacks summed per engine process, over its busy loop only."""

from bench.stack_profile import frame_key, parse, summarize

SITE = "/tmp/site/vllm"
ROOT = 'process 100:"python3 -P -m bench.throughput --paired; echo"'
STOCK = 'process 200:"VLLM::EngineCore"'
PLUGIN = 'process 300:"VLLM::EngineCore"'
LOOP = f"run_engine_core ({SITE}/v1/engine/core.py:1100);run_busy_loop ({SITE}/v1/engine/core.py:1259)"
STEP = f"step_with_batch_queue ({SITE}/v1/engine/core.py:519)"
SCHEDULE = f"schedule ({SITE}/v1/core/sched/scheduler.py:396)"
EXECUTE = f"execute_model ({SITE}/v1/worker/gpu/model_runner.py:1114)"
BEGIN = "begin_step (/tmp/kvc/vllm_kvcomp/engine/runtime.py:246)"
STARTUP = f"__init__ ({SITE}/v1/engine/core.py:80);compile (/tmp/site/torch/_dynamo/eval_frame.py:10)"

RAW = "\n".join(
    [
        f"{ROOT};<module> (bench/throughput.py:10) 500",
        f"{ROOT};{STOCK};{STARTUP} 9000",
        f"{ROOT};{STOCK};{LOOP};{STEP};{SCHEDULE} 30",
        f"{ROOT};{STOCK};{LOOP};{STEP};{EXECUTE} 70",
        f"{ROOT};{PLUGIN};{STARTUP} 9000",
        f"{ROOT};{PLUGIN};{LOOP};{STEP};{SCHEDULE} 30",
        f"{ROOT};{PLUGIN};{LOOP};{STEP};{EXECUTE} 50",
        f"{ROOT};{PLUGIN};{LOOP};{STEP};{EXECUTE};{BEGIN} 20",
        "a line that is not a stack",
    ]
)


def test_stacks_belong_to_the_innermost_process():
    stacks = parse(RAW)
    assert set(stacks) == {100, 200, 300}
    frames, count = stacks[300][-1]
    assert count == 20 and frames[0].startswith("run_engine_core") and frames[-1].startswith("begin_step")
    assert not any(frame.startswith("process") for frames, _ in stacks[300] for frame in frames)


def test_shares_count_the_busy_loop_only_and_label_the_plugin():
    engines = summarize(RAW)["engines"]
    assert set(engines) == {"200", "300"}  # the bench's own process never ran the busy loop
    stock, plugin = engines["200"], engines["300"]
    assert stock["label"] == "stock" and plugin["label"] == "plugin"
    assert stock["busy_loop_samples"] == 100 and plugin["busy_loop_samples"] == 100  # startup left out
    assert stock["phases"] == {"schedule": 0.3, "execute_model": 0.7}
    assert plugin["phases"]["execute_model"] == 0.7 and plugin["phases"]["kvcomp_begin_step"] == 0.2
    assert plugin["self"]["execute_model (vllm/v1/worker/gpu/model_runner.py)"] == 0.5
    assert "compile (torch/_dynamo/eval_frame.py)" not in plugin["inclusive"]


def test_a_recursive_function_counts_once_per_sample():
    raw = f"{STOCK};{LOOP};{STEP};f (/x/a.py:1);f (/x/a.py:2) 10"
    engine = summarize(raw)["engines"]["200"]
    assert engine["inclusive"]["f (/x/a.py)"] == 1.0


def test_frame_keys_drop_lines_and_install_prefixes():
    assert frame_key(SCHEDULE) == "schedule (vllm/v1/core/sched/scheduler.py)"
    assert frame_key(BEGIN) == "begin_step (vllm_kvcomp/engine/runtime.py)"
    assert frame_key("<module> (t.py:6)") == "<module> (t.py)"
    assert frame_key("thread (0x7f)") == "thread (0x7f)"


def test_callees_split_a_function_by_what_it_called():
    engines = summarize(RAW, expand=["execute_model@vllm/v1/worker/gpu/model_runner.py", "schedule"])["engines"]
    plugin = engines["300"]["callees"]
    assert plugin["execute_model@vllm/v1/worker/gpu/model_runner.py"] == {
        "<self>": 50,
        "begin_step (vllm_kvcomp/engine/runtime.py)": 20,
    }
    assert plugin["schedule"] == {"<self>": 30}
    assert engines["200"]["callees"]["execute_model@vllm/v1/worker/gpu/model_runner.py"] == {"<self>": 70}

"""`vllm serve ... --kv-compression zigzag` on a GPU: OpenAI API unchanged, clean shutdown.

Marked `gpu`. Set KVCOMP_RESULTS_DIR to keep a transcript (serve.json).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

PORT = 8123
METRICS_URL = f"http://127.0.0.1:{PORT}/metrics"  # the plugin's metrics are on vLLM's own /metrics


def _get(url: str, timeout: float = 5.0) -> str:
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from evaluation.random_model import make_random_model

    work = Path(os.environ.get("KVCOMP_WORK_DIR", tmp_path_factory.mktemp("serve")))
    model = str(make_random_model(work / "llama-1b", "llama-1b"))
    log_path = work / "serve.log"
    log = open(log_path, "w")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        model,
        "--port",
        str(PORT),
        "--served-model-name",
        "random-llama",
        "--kv-compression",
        "zigzag",
        "--kv-budget",
        "0.2",
        "--kv-cache-memory-bytes",
        str(4 << 30),
        "--max-model-len",
        "20000",
    ]
    injector = f"{Path(__file__).with_name('fault_injector.py')}:FaultInjector"  # only ids with "kvfault-"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_KVCOMP_OBSERVER": injector}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    deadline = time.time() + 420
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{log_path.read_text()[-4000:]}")
        try:
            if _get(f"http://127.0.0.1:{PORT}/health", 2) is not None:
                break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
        pytest.fail(f"server not healthy in time:\n{log_path.read_text()[-4000:]}")
    transcript: dict = {"command": " ".join(cmd[2:])}
    yield proc, transcript, log_path
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = os.environ.get("KVCOMP_RESULTS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "serve.json").write_text(json.dumps(transcript, indent=1))


def _long_prompt(words: int) -> str:
    return " ".join(f"w{(i * 7919) % 31000}" for i in range(words))


def test_openai_api_unchanged_and_compressing(server):
    from openai import OpenAI

    proc, transcript, _ = server
    client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none")
    models = [m.id for m in client.models.list().data]
    assert models == ["random-llama"]

    completion = client.completions.create(
        model="random-llama", prompt=_long_prompt(6000), max_tokens=16, temperature=0
    )
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage.prompt_tokens >= 6000 and completion.usage.completion_tokens >= 1

    chunks = list(
        client.completions.create(model="random-llama", prompt=_long_prompt(3000), max_tokens=16, stream=True)
    )
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("length", "stop")

    chat = client.chat.completions.create(
        model="random-llama",
        messages=[{"role": "user", "content": _long_prompt(4000)}],
        max_tokens=12,
    )
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="random-llama",
        messages=[{"role": "user", "content": _long_prompt(2000)}],
        max_tokens=12,
        stream=True,
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(deltas) >= 2

    vllm_metrics = _get(f"http://127.0.0.1:{PORT}/metrics")
    assert "vllm:num_requests_running" in vllm_metrics
    plugin_metrics = _get(METRICS_URL)
    compressed = [
        line for line in plugin_metrics.splitlines() if line.startswith("vllm_kvcomp_requests_compressed_total")
    ]
    assert compressed and float(compressed[0].split()[-1]) >= 4
    transcript.update(
        completion_text=completion.choices[0].text,
        completion_usage=completion.usage.model_dump(),
        stream_chunks=len(chunks),
        chat_text=chat.choices[0].message.content,
        chat_stream_deltas=len(deltas),
        plugin_metrics=[l for l in plugin_metrics.splitlines() if l.startswith("vllm_kvcomp_") and "layer=" not in l],
    )


def _kept_share(metrics_text: str) -> tuple[float, float, float]:
    """(requests compressed, kept tokens / prompt tokens summed over layers) from the exporter."""
    requests = kept = prompt = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("vllm_kvcomp_requests_compressed_total"):
            requests = float(line.split()[-1])
        elif line.startswith("vllm_kvcomp_tokens_kept_total"):
            kept += float(line.split()[-1])
        elif line.startswith("vllm_kvcomp_prompt_tokens_total"):
            prompt = float(line.split()[-1])
    return requests, kept, prompt


def test_per_request_budget_through_vllm_xargs(server):
    """OpenAI clients choose method/budget per request; bad values are a 400, not a crash."""
    import openai
    from openai import OpenAI

    proc, transcript, _ = server
    client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none")
    before = _kept_share(_get(METRICS_URL))
    client.completions.create(
        model="random-llama",
        prompt=_long_prompt(6000),
        max_tokens=4,
        extra_body={"vllm_xargs": {"kv_compression": "uniform", "kv_budget": 0.5}},
    )
    after = _kept_share(_get(METRICS_URL))
    assert after[0] == before[0] + 1
    layers = 16
    share = (after[1] - before[1]) / (after[2] - before[2]) / layers
    assert 0.48 <= share <= 0.56, share  # budget 0.5, rounded up to whole pages

    client.completions.create(
        model="random-llama",
        prompt=_long_prompt(6000),
        max_tokens=4,
        extra_body={"vllm_xargs": {"kv_compression": "none"}},
    )
    assert _kept_share(_get(METRICS_URL))[0] == after[0]  # served with full KV

    errors = {}
    for bad in ({"kv_budget": 1.5}, {"kv_compression": "snapkv"}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model="random-llama", prompt="w1 w2", max_tokens=2, extra_body={"vllm_xargs": bad}
            )
        errors[json.dumps(bad)] = str(err.value)[:300]
    assert "budget" in errors[json.dumps({"kv_budget": 1.5})]
    assert "snapkv" in errors[json.dumps({"kv_compression": "snapkv"})]
    assert client.completions.create(model="random-llama", prompt="w1 w2", max_tokens=2).choices  # still serving
    transcript.update(per_request_kept_share=share, per_request_errors=errors)


def test_bad_values_are_a_short_400_without_a_traceback(server):
    """What a new user tries: huge, boolean, misspelt and unbounded values (hardening issue, item 4)."""
    import openai
    from openai import OpenAI

    proc, transcript, log_path = server
    client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none")
    log_before = len(log_path.read_text())
    errors = {}
    for bad in (
        {"kv_budget": 10**30},
        {"kv_budget": True},
        {"kv_budget": 1e12},
        {"kv_budjet": 0.5},
        {"kv_budget": "9" * 5000},
        {"kv_compression": "z" * 5000},
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model="random-llama", prompt="w1 w2", max_tokens=2, extra_body={"vllm_xargs": bad}
            )
        message = err.value.body["message"] if isinstance(err.value.body, dict) else str(err.value)
        errors[json.dumps(bad)[:60]] = message
        assert len(message) < 300 and "\n" not in message, message
    new_log = log_path.read_text()[log_before:]
    assert "Exception in ASGI application" not in new_log and "Traceback" not in new_log, new_log[-3000:]
    transcript.update(bad_value_errors=errors)


def test_eviction_faults_stay_with_their_request(server):
    """Faults injected in a real engine (tests/engine/fault_injector.py): the server keeps serving."""
    import openai
    from openai import OpenAI

    proc, transcript, _ = server
    client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none")
    prompt = _long_prompt(4000)

    def metric(prefix: str) -> float:
        return sum(float(l.split()[-1]) for l in _get(METRICS_URL).splitlines() if l.startswith(prefix))

    # before compaction: served, uncompressed
    answer = client.completions.create(
        model="random-llama", prompt=prompt, max_tokens=8, extra_body={"request_id": "kvfault-score-1"}
    )
    assert answer.choices[0].text is not None
    assert metric('vllm_kvcomp_requests_skipped_total{reason="eviction_error_score"}') >= 1
    # after compaction: that request ends with an error, the others go on
    outcome = "completed"
    try:
        reply = client.completions.create(
            model="random-llama", prompt=prompt, max_tokens=8, extra_body={"request_id": "kvfault-relocate-1"}
        )
        outcome = f"finish_reason={reply.choices[0].finish_reason}"
        assert reply.choices[0].finish_reason not in ("stop", "length"), outcome
    except openai.APIStatusError as err:
        outcome = f"HTTP {err.status_code}"
    assert metric('vllm_kvcomp_requests_failed_total{reason="eviction_error_compact"}') >= 1
    compressed = metric("vllm_kvcomp_requests_compressed_total")
    assert client.completions.create(model="random-llama", prompt=prompt, max_tokens=8).choices[0].text is not None
    assert metric("vllm_kvcomp_requests_compressed_total") == compressed + 1
    assert _get(f"http://127.0.0.1:{PORT}/health", 5) is not None
    transcript.update(fault_after_compaction=outcome)


def test_clean_shutdown(server):
    proc, transcript, log_path = server
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=90)
    log = log_path.read_text()
    transcript["exit_code"] = code
    transcript["log_tail"] = log[-2500:]
    assert code == 0, log[-3000:]
    assert "Traceback" not in log.split("Shutting down")[-1]

"""GPU quality path: the real engine (vLLM + plugin), offline `LLM`.

One engine serves every configuration: it starts with compression on and each
request names its method and budget through the per-request override
(`SamplingParams.extra_args`, the OpenAI API's `vllm_xargs`); "none" requests
run with full KV on the same engine, so compressed and full answers come from
the same kernels, batch shapes aside. Every (sample, configuration) is one
request; the requests of one context length are submitted at once, and the results
are written after each length (a run cut short keeps what it finished; `--resume`
goes on from there).

Only the query-aware protocol exists here: vLLM prefills the whole prompt
(document + question) and compresses after prefill. The query-agnostic protocol
(question after compression, as kvpress measures) is the CPU path's
(`python -m evaluation --backend hf`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from evaluation.suite import label
from vllm_kvcomp.calibration_data import chat_prompt
from vllm_kvcomp.config import CompressionConfig

# tokens beyond the longest prompt and its answer that the engine's max_model_len allows
MODEL_LEN_MARGIN = 256


def row_key(row: dict) -> tuple:
    """One (prompt, configuration, protocol): what a resumed run skips."""
    return (row["config"], row["task"], row["context_len"], row["depth"], row["sample"], row["protocol"])


def max_model_len(prompt_lens: list[int], max_new_tokens: int) -> int:
    """The longest prompt plus its answer plus a margin, rounded up to 256 tokens."""
    need = max(prompt_lens) + max_new_tokens + MODEL_LEN_MARGIN
    return math.ceil(need / 256) * 256


class VLLMEvaluator:
    """The tokenizer at once; the engine (`start`) once the prompts, hence max_model_len, are known."""

    def __init__(
        self,
        model_dir: str,
        *,
        scorer: CompressionConfig,
        gpu_memory_utilization: float = 0.45,
        enforce_eager: bool = False,
    ):
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # The engine's own method/budget only matter for requests without an override (there are
        # none); the scorer options (and presets, where the plugin knows them) are the server's.
        self.engine_config = scorer.model_copy(update={"method": "uniform", "metrics_port": None}).model_dump()
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.startup_s = 0.0
        self.llm = None

    def start(self, max_model_len: int) -> None:
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(
            model=self.model_dir,
            dtype="bfloat16",
            seed=0,
            max_model_len=max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=False,
            additional_config={"kv_compression": self.engine_config},
        )
        self.startup_s = time.perf_counter() - t0

    def prompt_ids(self, sample) -> list[int]:
        head, question = chat_prompt(self.tokenizer, sample)
        return self.tokenizer(head + question, add_special_tokens=False)["input_ids"]


def request_args(name: str, config: CompressionConfig) -> dict:
    """SamplingParams.extra_args of one configuration: its method or preset by name, and the budget."""
    if not config.enabled:
        return {"kv_compression": "none"}
    return {"kv_compression": label(name), "kv_budget": config.budget}


def _row(sample, name: str, config: CompressionConfig, prompt_len: int, text: str) -> dict:
    return {
        "config": name,
        "method": label(name),
        "budget": config.budget if config.enabled else 1.0,
        "task": sample.task,
        "context_len": sample.context_len,
        "prompt_tokens": prompt_len,
        "depth": sample.depth,
        "sample": sample.meta.get("index", 0),
        "protocol": "aware",
        # nominal: the engine keeps ceil(budget * prompt) per layer on average
        "kept_fraction": min(1.0, config.average_budget(prompt_len) / prompt_len) if config.enabled else 1.0,
        "score": sample.score(text),
        "output": text[:80],
    }


def _requests(samples, ids, configs: dict[str, CompressionConfig], max_new_tokens: int, done: set):
    from vllm import SamplingParams

    requests, keys = [], []
    for sample, prompt in zip(samples, ids):
        for name, config in configs.items():
            key = (name, sample.task, sample.context_len, sample.depth, sample.meta.get("index", 0), "aware")
            if key in done:
                continue
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, extra_args=request_args(name, config))
            requests.append(({"prompt_token_ids": prompt}, params))
            keys.append((sample, name, config, len(prompt)))
    return requests, keys


def run_suite_vllm(
    evaluator: VLLMEvaluator,
    samples,
    configs: dict[str, CompressionConfig],
    max_new_tokens: int = 24,
    *,
    done: set | None = None,
    on_group: Callable[[list[dict]], None] | None = None,
):
    """Score every (sample, config) with the query-aware protocol; rows as in the CPU path.

    Starts the engine (max_model_len from the longest prompt) unless started. One batch per
    context length, shortest first; `on_group(rows so far)` after each. `done`: row keys
    (`row_key`) already scored by an earlier run, skipped.
    """
    ids = [evaluator.prompt_ids(s) for s in samples]
    if evaluator.llm is None:
        evaluator.start(max_model_len([len(x) for x in ids], max_new_tokens))
    rows: list[dict] = []
    seconds = 0.0
    for length in sorted({s.context_len for s in samples}):
        group = [i for i, s in enumerate(samples) if s.context_len == length]
        requests, keys = _requests(
            [samples[i] for i in group], [ids[i] for i in group], configs, max_new_tokens, done or set()
        )
        if not requests:
            continue
        t0 = time.perf_counter()
        outputs = evaluator.llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=True)
        seconds += time.perf_counter() - t0
        for (sample, name, config, prompt_len), output in zip(keys, outputs, strict=True):
            rows.append(_row(sample, name, config, prompt_len, output.outputs[0].text))
        if on_group:
            on_group(rows)
    return rows, seconds

"""GPU quality path: the real engine (vLLM + plugin), offline `LLM`.

One engine serves every configuration: it starts with compression on and each
request names its method and budget through the per-request override
(`SamplingParams.extra_args`, the OpenAI API's `vllm_xargs`); "none" requests
run with full KV on the same engine, so compressed and full answers come from
the same kernels, batch shapes aside. Every (sample, configuration) is one
request and all are submitted at once.

Only the query-aware protocol exists here: vLLM prefills the whole prompt
(document + question) and compresses after prefill. The query-agnostic protocol
(question after compression, as kvpress measures) is the CPU path's
(`python -m evaluation --backend hf`).
"""

from __future__ import annotations

import time

from vllm_kvcomp.calibration_data import chat_prompt
from vllm_kvcomp.config import CompressionConfig


class VLLMEvaluator:
    def __init__(
        self, model_dir: str, *, max_model_len: int, scorer: CompressionConfig, gpu_memory_utilization: float = 0.6
    ):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # The engine's own method/budget only matter for requests without an
        # override (there are none); the scorer options are the server's.
        engine_config = scorer.model_copy(update={"method": "uniform", "metrics_port": None}).model_dump()
        t0 = time.perf_counter()
        self.llm = LLM(
            model=model_dir,
            dtype="bfloat16",
            seed=0,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=False,
            additional_config={"kv_compression": engine_config},
        )
        self.startup_s = time.perf_counter() - t0


def run_suite_vllm(evaluator: VLLMEvaluator, samples, configs: dict[str, CompressionConfig], max_new_tokens: int = 24):
    """Score every (sample, config) with the query-aware protocol; rows as in the CPU path."""
    from vllm import SamplingParams

    tok = evaluator.tokenizer
    prompts, keys = [], []
    for sample in samples:
        head, question = chat_prompt(tok, sample)
        ids = tok(head + question, add_special_tokens=False)["input_ids"]
        for name, config in configs.items():
            extra = {"kv_compression": config.method}
            if config.enabled:
                extra["kv_budget"] = config.budget
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, extra_args=extra)
            prompts.append(({"prompt_token_ids": ids}, params))
            keys.append((sample, name, config, len(ids)))
    t0 = time.perf_counter()
    outputs = evaluator.llm.generate([p for p, _ in prompts], [s for _, s in prompts], use_tqdm=True)
    seconds = time.perf_counter() - t0
    rows = []
    for (sample, name, config, prompt_len), output in zip(keys, outputs, strict=True):
        text = output.outputs[0].text
        budget = config.budget if config.enabled else 1.0
        rows.append(
            {
                "config": name,
                "method": config.method,
                "budget": budget,
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
        )
    return rows, seconds

"""Long-output quality with lifetime budgets (issue #12) through vLLM, against full KV on the same prompts.

    python -m evaluation.long_output_vllm --model DIR --name long_output_qwen05 \\
        --budgets 1024,2048 --evict-every 128 --prompts 16 --items 800      (GPU, from a checkout)

One engine with decode-time eviction on (`evict_every`); every prompt runs with
full KV (`kv_compression: none`) and at every token budget (`kv_budget`), greedy
for a whole answer with no end token before it (`greedy_whole_answer`;
evaluation/long_output.py). Writes
<out>/<name>.json: `results`, one per budget, with `budget`, `score` (item
accuracy), `full_score`, `score_last_quarter` / `full_score_last_quarter` (the
late items, which depend on facts stated long before), and `agreement` (the
greedy-agreement curve against full KV over the generated length); plus the
command, date, device and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

from bench.offline import current_commit
from evaluation.long_output import agreement_curve, answer_tokens, item_accuracy, make_task, prompt_accuracies
from evaluation.report import paired_delta_ci
from evaluation.vllm_backend import max_model_len


def filler_sentences(num_chars: int = 5000) -> list[str]:
    """Real text (Python's standard-library docstrings) around the rules, as the RULER-style tasks use."""
    from vllm_kvcomp.calibration_data import _stdlib_text

    return [s + " " for s in re.split(r"(?<=[.!?]) ", _stdlib_text()[:num_chars])]


def requests_for(tasks, tokenizer, budgets: list[float]):
    """(prompt ids, extra_args, key) for full KV and each budget of every task."""
    out = []
    for t, task in enumerate(tasks):
        # text first: apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": task.prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append((ids, {"kv_compression": "none"}, (t, None)))
        out += [(ids, {"kv_budget": budget}, (t, budget)) for budget in budgets]
    return out


def greedy_whole_answer(max_tokens: int) -> dict:
    """Greedy, exactly `max_tokens` tokens. min_tokens masks the end-of-sequence tokens until then,
    so a model that would stop early writes more items instead of an end token; ignore_eos alone
    lets it sample the end token and then continue after it (the first GPU run: qwen05's full KV
    scored 0.04 of the items, while on the CPU it wrote the first 80 of 80 right)."""
    return {"max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


def summarize(tasks, texts: dict, tokens: dict, budgets: list[float]) -> list[dict]:
    """One result per budget from the outputs keyed by (task index, budget or None for full KV)."""
    n = range(len(tasks))
    full_texts = [texts[(t, None)] for t in n]
    quarter = max(1, tasks[0].num_items // 4)
    results = []
    full_per_prompt = prompt_accuracies(tasks, full_texts)  # full KV's scores: once, for every budget
    full_score = sum(full_per_prompt) / len(full_per_prompt)
    full_last_quarter = item_accuracy(tasks, full_texts, last_items=quarter)
    full_tokens = [tokens[(t, None)] for t in n]
    for budget in budgets:
        got = [texts[(t, budget)] for t in n]
        per_prompt = prompt_accuracies(tasks, got)
        delta, lo, hi = paired_delta_ci(per_prompt, full_per_prompt)
        results.append(
            {
                "budget": budget,
                "score": sum(per_prompt) / len(per_prompt),  # item_accuracy, from the same per-prompt shares
                "full_score": full_score,
                # paired over prompts: the budget's item accuracy minus full KV's, 95% bootstrap interval
                "delta_vs_full": delta,
                "delta_vs_full_ci95": [lo, hi],
                "per_prompt": per_prompt,
                "full_per_prompt": full_per_prompt,
                "score_last_quarter": item_accuracy(tasks, got, last_items=quarter),
                "full_score_last_quarter": full_last_quarter,
                "agreement": agreement_curve([tokens[(t, budget)] for t in n], full_tokens),
            }
        )
    return results


def run(args) -> dict:
    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    filler = filler_sentences()
    tasks = [make_task(args.seed, args.items, filler, index=i) for i in range(args.prompts)]
    config = {"method": args.method, "budget": max(args.budgets), "evict_every": args.evict_every}
    reqs = requests_for(tasks, tokenizer, args.budgets)
    max_tokens = max(answer_tokens(task, tokenizer) for task in tasks)
    # the longest prompt and its whole answer (max_model_len caps what a request may generate)
    model_len = args.max_model_len or max_model_len([len(ids) for ids, _, _ in reqs], max_tokens)
    llm = LLM(
        model=args.model,
        dtype="bfloat16",
        seed=0,
        max_model_len=model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,
        additional_config={"kv_compression": config},
    )
    params = [SamplingParams(**greedy_whole_answer(max_tokens), extra_args=extra) for _, extra, _ in reqs]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids, _, _ in reqs], params, use_tqdm=True)
    texts = {key: o.outputs[0].text for (_, _, key), o in zip(reqs, outputs, strict=True)}
    tokens = {key: list(o.outputs[0].token_ids) for (_, _, key), o in zip(reqs, outputs, strict=True)}
    return {
        "model": args.model_name or args.model,
        "compression": config,
        "prompts": args.prompts,
        "items": args.items,
        "max_tokens": max_tokens,
        "max_model_len": model_len,
        "results": summarize(tasks, texts, tokens, args.budgets),
        # what the model wrote for the first prompt (start and end), to read a low score by eye
        "samples": {
            "full" if budget is None else f"{budget:g}": {
                "head": texts[(0, budget)][:300],
                "tail": texts[(0, budget)][-300:],
            }
            for budget in [None, *args.budgets]
        },
        "command": "python -m evaluation.long_output_vllm " + " ".join(sys.argv[1:]),
        "commit": current_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation.long_output_vllm", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--model-name")
    p.add_argument("--name", default="long_output")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--method", default="uniform")
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[1024.0, 2048.0])
    p.add_argument("--evict-every", type=int, default=128)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--items", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, help="default: the longest prompt and its whole answer")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    record = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    for r in record["results"]:
        print(f"[long-output] budget {r['budget']:g}: items {r['score']:.3f} (full {r['full_score']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

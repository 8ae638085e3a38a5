"""Do ZigZagKV's layer budgets move between the prefill and the decode (issue #12, step 2's decision)?

    python -m bench.decode_budget_drift --model DIR [--model DIR2] --out bench/results/lifetime   (CPU)

Decode-time eviction keeps each layer's share of the budget from the prefill (engine/decode_eviction.py:
`decode_budgets` scales the prefill's shares to the current budget). The alternative is to recompute
the shares at every decode-time eviction from the last `decode_window` decode queries. This measures
how far apart the two would be on a real model, with full KV (no eviction, so the recomputed shares
are what an engine that recomputes would see before its first decode-time eviction):

* prefill weights u_l: ZigZagKV's LMBA from the last `window` prompt queries (the engine's statistics);
* decode weights at generated lengths t: the same from the last `decode_window` decode queries over
  the prompt and the t generated tokens;
* per pair: the share of the total budget that would move between layers, sum |B_l - B'_l| / (2 sum B_l)
  with Eq. 6 at a 1,024-token budget, and the Spearman rank correlation of the weights.

The prompts are the long-output task's (evaluation/long_output.py), greedy decoding with transformers on
CPU (the plugin's own statistics: `scoring.head_statistics`, the kernels' torch reference).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bench.offline import current_commit

BUDGET = 1024  # tokens per layer on average (a lifetime budget of issue #12)
MIN_RATIO = 0.2  # ZigZagKV's B_min = 0.2 B_avg (configs/zigzag.yaml)


def eq6_budgets(weights: np.ndarray) -> np.ndarray:
    """ZigZagKV Eq. 6 with weights of mean 1: B_l = B_min + (B_avg - B_min) w_l."""
    b_min = MIN_RATIO * BUDGET
    return b_min + (BUDGET - b_min) * weights


def moved_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the total budget that moves between layers going from weights a to weights b."""
    ba, bb = eq6_budgets(a), eq6_budgets(b)
    return float(np.abs(ba - bb).sum() / (2 * ba.sum()))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def layer_weights(queries: list[torch.Tensor], keys: list[torch.Tensor], scale: float, tau: float) -> np.ndarray:
    """u_l (mean 1) from each layer's window queries [W, Hq, D] over its keys [S, Hkv, D] (causal: the
    queries are the last W positions), as the engine computes ZigZagKV's statistics."""
    from vllm_kvcomp.kernels.reference import window_scores_reference

    from vllm_kvcomp.calibrate import normalized_weights
    from vllm_kvcomp.scoring import head_statistics

    lmba = []
    for q, k in zip(queries, keys, strict=True):
        _, mass = window_scores_reference(q, k, scale=scale, pool_kernel=1, pool_type="max", square=False)
        mba, _ = head_statistics(mass[None], torch.tensor([k.shape[0]]), tau=tau, num_sinks=4, local_recent=64)
        lmba.append(float(mba.mean()))
    return normalized_weights(np.array(lmba))


@torch.inference_mode()
def measure(model_dir: str, prompts: int, items: int, checkpoints: list[int], window: int, decode_window: int):
    from transformers import DynamicCache

    from evaluation.long_output import make_task
    from evaluation.long_output_vllm import filler_sentences
    from vllm_kvcomp.hf_prefill import CAPTURE, HFPrefiller

    prefiller = HFPrefiller(model_dir)
    tok, model = prefiller.tokenizer, prefiller.model
    scale = prefiller.head_dim**-0.5
    out = []
    for index in range(prompts):
        task = make_task(0, items, filler_sentences(), index=index)
        text = tok.apply_chat_template(
            [{"role": "user", "content": task.prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        cache = DynamicCache()
        CAPTURE.window, CAPTURE.queries = window, {}
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        prefill_q = [CAPTURE.queries[layer] for layer in range(prefiller.num_layers)]
        keys = [cache.layers[layer].keys[0].transpose(0, 1).float() for layer in range(prefiller.num_layers)]
        weights = {"prefill": layer_weights(prefill_q, keys, scale, 0.9)}
        recent: list[list[torch.Tensor]] = [[] for _ in range(prefiller.num_layers)]
        generated = []
        for step in range(1, max(checkpoints) + 1):
            token = logits[0, -1].argmax().view(1, 1)
            generated.append(int(token))
            CAPTURE.window, CAPTURE.queries = 1, {}
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            for layer in range(prefiller.num_layers):
                recent[layer] = [*recent[layer][-(decode_window - 1) :], CAPTURE.queries[layer][0]]
            if step in checkpoints:
                q = [torch.stack(r) for r in recent]
                k = [cache.layers[layer].keys[0].transpose(0, 1).float() for layer in range(prefiller.num_layers)]
                weights[f"decode@{step}"] = layer_weights(q, k, scale, 0.9)
        CAPTURE.queries = None
        names = list(weights)
        pairs = [
            {
                "a": a,
                "b": b,
                "moved_share": moved_share(weights[a], weights[b]),
                "spearman": spearman(weights[a], weights[b]),
            }
            for i, a in enumerate(names)
            for b in names[i + 1 :]
        ]
        out.append(
            {
                "prompt": index,
                "prompt_tokens": int(ids.shape[1]),
                "answer_head": tok.decode(generated[:60]),
                "weights": {k: [round(float(x), 4) for x in v] for k, v in weights.items()},
                "pairs": pairs,
            }
        )
        summary = [f"{p['a']}->{p['b']} moved {p['moved_share']:.1%} rho {p['spearman']:.2f}" for p in pairs]
        print(f"[drift] {Path(model_dir).name} prompt {index}: " + "; ".join(summary), flush=True)
    # across prompts at the prefill: how much the weights move from one prompt to another anyway
    across = [moved_share(np.array(a["weights"]["prefill"]), np.array(b["weights"]["prefill"]))
              for i, a in enumerate(out) for b in out[i + 1 :]]  # fmt: skip
    return {"model": Path(model_dir).name, "prompts": out, "prefill_across_prompts_moved_share": across}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_budget_drift", description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, help="a model folder (repeat for several)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--checkpoints", default="128,256,512")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--decode-window", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/lifetime"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = [int(x) for x in args.checkpoints.split(",")]
    record = {
        "command": "python -m bench.decode_budget_drift " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": current_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "CPU",
        "torch": torch.__version__,
        "budget_tokens": BUDGET,
        "min_budget_ratio": MIN_RATIO,
        "models": [
            measure(m, args.prompts, args.items, checkpoints, args.window, args.decode_window) for m in args.model
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_budget_drift.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU quality path: transformers + the plugin's own scorer, policies and block plan.

No GPU and no vLLM: the model runs in transformers (`vllm_kvcomp/hf_prefill.py`,
the prefill `vllm-kvcomp calibrate` uses) with an attention function that

  * during the prompt's prefill records each layer's post-RoPE queries of the
    observation window (the same queries the engine captures), and
  * afterwards hides evicted tokens from each (layer, KV head) with a mask, which
    is numerically what the engine's compaction does (evicted tokens are gone,
    the survivors keep their positions).

Decisions are the engine's: the reference scorer (`kernels/reference.py`), the
same statistics (`vllm_kvcomp/scoring.py`) and the engine's planner
(`vllm_kvcomp/planner.py`: the method's policy, then the block plan of
`engine/layout.py`: whole pages, the last prompt block kept whole).
One prefill per sample serves every (method, budget): the cache is cropped back
to the prompt after each answer.

Protocols: "agnostic" compresses the document only and asks the question after
(kvpress' default); "aware" compresses document + question (what `vllm serve`
does: the whole prompt is prefilled, then compressed), and the first answer token
comes from the uncompressed prefill, as in vLLM.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from evaluation.suite import label
from vllm_kvcomp import planner
from vllm_kvcomp.calibration_data import chat_prompt
from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.hf_prefill import HFPrefiller, Prefilled, capture_window
from vllm_kvcomp.scoring import head_statistics, selection_scores, stats_for_policy

ATTENTION_NAME = "kvcomp_eval"


class _Eviction:
    evicted: dict[int, torch.Tensor] = {}  # per layer [Hkv, P] True = evicted, while answering


STATE = _Eviction()


def kvcomp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture_window(module, query)
    evicted = STATE.evicted.get(module.layer_idx)
    q_len, k_len = query.shape[2], key.shape[2]
    if evicted is None and (q_len == k_len or q_len == 1):
        # prefill without cache, or one decode token: plain causal SDPA is exact
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # Several new tokens over a cache: causal must be aligned bottom-right (SDPA's
    # is_causal aligns top-left), and evicted tokens are hidden per KV head.
    groups = query.shape[1] // key.shape[1]
    keep = torch.ones(key.shape[1], k_len, dtype=torch.bool)
    if evicted is not None:
        keep[:, : evicted.shape[1]] = ~evicted
    causal = torch.arange(k_len).view(1, -1) <= (k_len - q_len + torch.arange(q_len)).view(-1, 1)
    mask = keep.repeat_interleave(groups, 0)[:, None, :] & causal[None]
    out = F.scaled_dot_product_attention(
        query,
        key.repeat_interleave(groups, 1),
        value.repeat_interleave(groups, 1),
        attn_mask=mask[None],
        scale=scaling,
    )
    return out.transpose(1, 2).contiguous(), None


class HFEvaluator(HFPrefiller):
    """The calibration prefill plus the engine's eviction (as masks) and greedy answers."""

    attention_name = ATTENTION_NAME
    attention = staticmethod(kvcomp_attention)

    def __init__(self, model_dir: str, threads: int | None = None, block_size: int = 16):
        super().__init__(model_dir, threads=threads)
        self.block_size = block_size

    def prefill(self, text: str, scorer: CompressionConfig):
        STATE.evicted = {}
        return super().prefill(text, scorer)

    def eviction_masks(self, pre: Prefilled, config: CompressionConfig) -> tuple[dict[int, torch.Tensor], float]:
        """Per layer [Hkv, P] evicted-token masks, as the engine would decide; and the kept fraction."""
        P, bs, L = pre.prompt_len, self.block_size, self.num_layers
        if not config.should_compress(P):
            return {}, 1.0
        lens = torch.tensor([P])
        # every layer at once: layers as the batch of head_statistics, [L, Hkv] each
        mba, local_mass = head_statistics(torch.stack(pre.mass), torch.full((L,), P), **stats_for_policy(config))
        # `layer_share`: each layer uses its share group's first layer (as the engine does)
        scoring = [layer - layer % config.layer_share for layer in range(L)]
        mba, local_mass = mba[scoring], local_mass[scoring]
        plan = planner.plan(config, planner.layer_stats(mba, local_mass), P, L, bs)
        if plan is None:
            return {}, 1.0
        masks = {}
        domain = plan.full_blocks * bs
        for layer in range(L):
            if not plan.evicted_layers[layer]:
                continue
            keep = int(plan.compact_pages[layer]) * bs
            scores = selection_scores(
                pre.scores[scoring[layer]][None],
                lens,
                torch.tensor([domain]),
                num_sinks=config.num_sinks,
                num_recent=config.num_recent,
            )[0]
            top = scores[:, :domain].topk(keep, dim=-1).indices
            evicted = torch.ones(scores.shape[0], P, dtype=torch.bool)
            evicted.scatter_(1, top, False)
            evicted[:, domain:] = False
            masks[layer] = evicted
        return masks, float(plan.kept_tokens.sum()) / (P * L)

    @torch.inference_mode()
    def answer(self, cache, pre: Prefilled, suffix: str, masks, max_new_tokens: int, first_from_prefill: bool) -> str:
        STATE.evicted = masks
        try:
            tokens: list[int] = []
            if first_from_prefill:
                tokens.append(pre.first_token)
                next_ids = torch.tensor([[pre.first_token]])
            else:
                next_ids = self._ids(suffix)
            eos = self.tokenizer.eos_token_id
            while len(tokens) < max_new_tokens:
                logits = self.model(input_ids=next_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                token = int(logits[0, -1].argmax())
                if token == eos:
                    break
                tokens.append(token)
                next_ids = torch.tensor([[token]])
            return self.tokenizer.decode(tokens, skip_special_tokens=True)
        finally:
            STATE.evicted = {}
            extra = cache.get_seq_length() - pre.prompt_len
            if extra > 0:
                cache.crop(-extra)  # back to the prompt for the next configuration


def run_suite(
    evaluator: HFEvaluator, samples, configs: dict[str, CompressionConfig], protocols, max_new_tokens=24, progress=None
):
    """Score every (sample, protocol, config); one prefill per (sample, protocol)."""
    rows = []
    scorer = next(iter(configs.values()))
    for sample in samples:
        head, question = chat_prompt(evaluator.tokenizer, sample)
        for protocol in protocols:
            t0 = time.time()
            if protocol == "agnostic":
                cache, pre = evaluator.prefill(head, scorer)
                suffix, first = question, False
            else:
                cache, pre = evaluator.prefill(head + question, scorer)
                suffix, first = "", True
            for name, config in configs.items():
                masks, kept = evaluator.eviction_masks(pre, config) if config.enabled else ({}, 1.0)
                output = evaluator.answer(cache, pre, suffix, masks, max_new_tokens, first)
                rows.append(
                    {
                        "config": name,
                        "method": label(name),  # the method or preset name
                        "budget": config.budget if config.enabled else 1.0,
                        "task": sample.task,
                        "context_len": sample.context_len,
                        "prompt_tokens": pre.prompt_len,
                        "depth": sample.depth,
                        "sample": sample.meta.get("index", 0),
                        "protocol": protocol,
                        "kept_fraction": kept,
                        "score": sample.score(output),
                        "output": output[:80],
                    }
                )
            if progress:
                progress(sample, protocol, time.time() - t0)
    return rows

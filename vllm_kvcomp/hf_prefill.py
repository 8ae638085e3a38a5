"""Prefill on CPU with transformers, scoring the prompt the way the engine does.

No GPU and no vLLM: the model runs in transformers with an attention function
that, during a prompt's prefill, records each layer's post-RoPE queries of the
observation window (the same queries the engine captures); the window's
attention over the layer's keys is then scored by the reference scorer
(`kernels/reference.py`, what the score-gather kernel computes on the GPU).

`vllm-kvcomp calibrate` measures the layers' uncertainty from these scores; the
evaluation harness (`evaluation/hf_backend.py`, run from a checkout) subclasses
`HFPrefiller` to also apply the engine's eviction decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.kernels.reference import window_scores_reference

ATTENTION_NAME = "kvcomp"


class _Capture:
    window: int = 0
    queries: dict[int, torch.Tensor] | None = None  # per layer [w, Hq, D], while a prefill is captured


CAPTURE = _Capture()


def capture_window(module: Any, query: torch.Tensor) -> None:
    """Record the layer's last `window` queries while a prefill is being captured."""
    if CAPTURE.queries is not None:
        CAPTURE.queries[module.layer_idx] = query[0, :, -CAPTURE.window :, :].transpose(0, 1).float().clone()


def capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention, recording the observation window's queries on the way."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture_window(module, query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@dataclass
class Prefilled:
    """One prompt prefilled with full KV, plus what every method needs to decide."""

    prompt_len: int
    scores: list[torch.Tensor]  # per layer [Hkv, P], pooled (selection)
    mass: list[torch.Tensor]  # per layer [Hkv, P], unpooled window attention (statistics)
    first_token: int  # greedy token from the full-KV prefill


class HFPrefiller:
    """A transformers model (bf16, CPU) whose prefills also score every layer's prompt tokens."""

    attention_name = ATTENTION_NAME
    attention = staticmethod(capture_attention)

    def __init__(self, model_dir: str, threads: int | None = None):
        from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        AttentionInterface.register(self.attention_name, self.attention)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, attn_implementation=self.attention_name
        ).eval()
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    @torch.inference_mode()
    def prefill(self, text: str, scorer: CompressionConfig):
        """Full-KV prefill; returns the cache and the scores of every layer."""
        from transformers import DynamicCache

        ids = self._ids(text)
        cache = DynamicCache()
        CAPTURE.window, CAPTURE.queries = min(scorer.window, ids.shape[1]), {}
        try:
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            captured = CAPTURE.queries
        finally:
            CAPTURE.queries = None
        scores, mass = [], []
        for layer in range(self.num_layers):
            keys = cache.layers[layer].keys[0].transpose(0, 1).float()  # [P, Hkv, D]
            s, m = window_scores_reference(
                captured[layer],
                keys,
                scale=self.head_dim**-0.5,
                pool_kernel=scorer.pool_kernel,
                pool_type=scorer.pool_type,
                square=scorer.square,
            )
            scores.append(s)
            mass.append(m)
        first = int(out.logits[0, -1].argmax())
        return cache, Prefilled(ids.shape[1], scores, mass, first)

"""A test-only eviction observer: an oracle scorer that always keeps a planted needle.

Loaded by the engine through `VLLM_KVCOMP_OBSERVER=<this file>:NeedleOracle`
(see vllm_kvcomp/engine/verify.py). `VLLM_KVCOMP_FORCE_KEEP=a:b` names the prompt
positions [a, b) to keep; `VLLM_KVCOMP_VERIFY=N` how many requests to check.
The self-check then also requires the needle in every layer and KV head.
"""

from __future__ import annotations

import os

import torch

from vllm_kvcomp.engine.verify import Verifier

FORCE_KEEP_ENV = "VLLM_KVCOMP_FORCE_KEEP"


class NeedleOracle(Verifier):
    def __init__(self) -> None:
        super().__init__()
        start, end = (int(x) for x in os.environ[FORCE_KEEP_ENV].split(":"))
        self.needle = (start, end)

    def score_hook(self, scores: torch.Tensor) -> torch.Tensor:
        """Needle positions +inf, except those outside the evictable domain (-inf stays)."""
        start, end = self.needle
        part = scores[..., start:end]
        scores[..., start:end] = torch.where(part == float("-inf"), part, torch.full_like(part, float("inf")))
        return scores

    def check(self, runtime, req, plan, keep_by_layer, snapshot) -> dict:
        result = super().check(runtime, req, plan, keep_by_layer, snapshot)
        start, end = self.needle
        wanted = torch.arange(start, min(end, plan.full_blocks * runtime.geometry.block_size), device=runtime.device)
        result["needle"] = all(bool(torch.isin(wanted.view(1, -1), idx).all()) for idx in keep_by_layer.values())
        return result

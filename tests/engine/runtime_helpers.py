"""Helpers shared by the CPU runtime tests: a fake vLLM InputBatch and an observer that fails a stage."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from vllm_kvcomp.engine.verify import EvictionObserver


def make_batch(rows):
    """rows: (req_id, runner index, computed tokens, scheduled tokens, prefilling), in batch order, as
    vLLM's InputBatch."""
    scheduled = np.array([r[3] for r in rows], dtype=np.int32)
    return SimpleNamespace(
        req_ids=[r[0] for r in rows],
        num_reqs=len(rows),
        idx_mapping=torch.tensor([r[1] for r in rows], dtype=torch.int32),
        idx_mapping_np=np.array([r[1] for r in rows], dtype=np.int32),
        is_prefilling_np=np.array([r[4] for r in rows], dtype=bool),
        query_start_loc_np=np.concatenate([[0], np.cumsum(scheduled)]).astype(np.int32),
        num_computed_tokens_np=np.array([r[2] for r in rows], dtype=np.int32),
        num_scheduled_tokens=scheduled,
    )


class FailAt(EvictionObserver):
    """Raises a CUDA out-of-memory error when the eviction reaches `stage`."""

    def __init__(self, stage):
        self.stage = stage

    def before(self, stage, args):
        if stage == self.stage:
            raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory")

"""A test-only eviction observer that injects faults into a running engine.

Loaded by the engine through `VLLM_KVCOMP_OBSERVER=<this file>:FaultInjector`.
A request whose id contains `kvfault-<stage>` (OpenAI API: `"request_id":
"kvfault-score-1"`) makes the eviction of its batch raise before that stage:
"score", "plan" and "compact" leave its KV intact (served uncompressed),
"relocate" comes after compaction (finished with an error).

`kvfault-rank1-<stage>` raises on tensor-parallel rank 1 only: the other ranks
must reach the same decision through the shared failure flag instead of waiting
in a collective (the chaos run's TP=2 case).

It is also the `Verifier`: with `VLLM_KVCOMP_VERIFY=N` the first N compressed
batches of each worker are self-checked as without the injector.
"""

from __future__ import annotations

import torch

from vllm_kvcomp.engine.verify import Verifier


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (ImportError, AssertionError, AttributeError):  # no TP group (CPU tests)
        return 0


class FaultInjector(Verifier):
    def before(self, stage: str, args: tuple) -> None:
        reqs = next((a for a in args if isinstance(a, list)), [])
        ids = [getattr(r, "req_id", "") for r in reqs]
        everywhere = [i for i in ids if f"kvfault-{stage}" in i]
        on_rank1 = [i for i in ids if f"kvfault-rank1-{stage}" in i]
        if everywhere or (on_rank1 and _tp_rank() == 1):
            raise torch.cuda.OutOfMemoryError(f"injected fault before {stage} for {(everywhere or on_rank1)[0]}")

"""A test-only eviction observer that injects faults into a running engine.

Loaded by the engine through `VLLM_KVCOMP_OBSERVER=<this file>:FaultInjector`.
A request whose id contains `kvfault-<stage>` (OpenAI API: `"request_id":
"kvfault-score-1"`) makes the eviction of its batch raise before that stage:
"score", "plan" and "compact" leave its KV intact (served uncompressed),
"relocate" comes after compaction (finished with an error).
"""

from __future__ import annotations

import torch

from vllm_kvcomp.engine.verify import EvictionObserver


class FaultInjector(EvictionObserver):
    def before(self, stage: str, args: tuple) -> None:
        reqs = next((a for a in args if isinstance(a, list)), [])
        marked = [r.req_id for r in reqs if f"kvfault-{stage}" in getattr(r, "req_id", "")]
        if marked:
            raise torch.cuda.OutOfMemoryError(f"injected fault before {stage} for {marked[0]}")

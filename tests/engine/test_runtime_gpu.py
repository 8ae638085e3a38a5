"""On the GPU: the runtime's warm-up compiles every kernel variant that serving can hit.

After `setup` (which warms up), evictions of odd lengths and batch sizes and page
tables for any number of requests must not compile anything (hardening issue,
item 7: no compilation while serving).
"""

import numpy as np
import pytest
import torch

from vllm_kvcomp.config import build_config
from vllm_kvcomp.engine.layout import cdiv
from vllm_kvcomp.engine.requests import WindowRows
from vllm_kvcomp.engine.runtime import CompressionRuntime

pytestmark = pytest.mark.gpu

L, HKV, G, D, BS, N, WIDTH = 4, 2, 4, 64, 16, 400, 96
HQ = HKV * G


def compiled_variants() -> int:
    from vllm_kvcomp.kernels import compaction, score_gather_kernels

    from vllm_kvcomp.engine import page_tables

    kernels = [
        score_gather_kernels.lse_partial_kernel,
        score_gather_kernels.window_sum_kernel,
        score_gather_kernels.pool_gqa_kernel,
        compaction._compact_kernel,
        compaction._copy_pages_kernel,
        page_tables._layer_page_tables_kernel,
    ]
    total = 0
    for kernel in kernels:
        fn = kernel if hasattr(kernel, "device_caches") else kernel.fn  # an Autotuner wraps its JITFunction
        total += sum(len(cache[0]) for cache in fn.device_caches.values())
    return total


def test_warm_up_covers_every_serving_shape():
    config = build_config(method="zigzag", budget="0.25", overrides={"metrics_port": None})
    runtime = CompressionRuntime(config, vllm_config=None)
    pool = torch.randn(L * N, 2, BS, HKV, D, device="cuda").to(torch.bfloat16)
    runtime.setup(
        layer_names=[f"layers.{i}" for i in range(L)],
        pool=pool,
        blocks_per_layer=N,
        block_size=BS,
        num_heads=HQ,
        scale=D**-0.5,
        max_reqs=32,
        width=WIDTH,
    )
    torch.cuda.synchronize()
    after_warm_up = compiled_variants()
    assert after_warm_up > 0
    rng = np.random.default_rng(0)
    for batch, lengths in enumerate([[1000], [777, 1201, 333], [1500, 1499], [64 * 16, 65 * 16 + 1, 999, 500, 1311]]):
        blocks = iter(rng.permutation(np.arange(1, N)).tolist())
        reqs = []
        for i, p in enumerate(lengths):
            runtime.add_request(
                f"b{batch}r{i}", index=i + 1, block_ids=[next(blocks) for _ in range(cdiv(p, BS))], prompt_len=p
            )
            req = runtime.requests[f"b{batch}r{i}"]
            window = min(config.window, p)
            req.rows = WindowRows(runtime.capture_buffers.free_slots.pop(), window, np.ones(window, dtype=bool))
            runtime.capture_buffers.queries[:, req.rows.slot].normal_()
            runtime.capture_buffers.lse[:, req.rows.slot].fill_(8.0)
            reqs.append(req)
        report = runtime._evict(reqs)
        assert len(report.evictions) == len(lengths), report
        for num_reqs in (1, 3, 16, 17):
            table = torch.randint(1, N, (num_reqs, WIDTH), dtype=torch.int32, device="cuda")
            lens = torch.randint(1, WIDTH * BS, (num_reqs,), dtype=torch.int32, device="cuda")
            runtime._idx_mapping = torch.arange(num_reqs, dtype=torch.int32, device="cuda")
            runtime._num_reqs = num_reqs
            runtime.layer_tables(table, lens)
        for req in reqs:
            runtime.remove_request(req.req_id)
    torch.cuda.synchronize()
    assert compiled_variants() == after_warm_up, "serving compiled a kernel variant the warm-up did not"

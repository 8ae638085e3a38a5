"""Launch configurations of the score-gather kernels (kernels/score_gather_kernels.py).

Each kernel is ``@triton.autotune`` d over a candidate list; the autotune policy
(what is timed, when) is in kernels/common.py. The first candidate of each list
is the configuration tuned on an H100 (bench/KERNELS-NOTES.md) and the only one
used unless tuning is switched on (``VLLM_KVCOMP_AUTOTUNE=1``, the benchmark's
``--tune``); the others are the benchmark's former sweep.

Autotune re-runs a kernel while it times candidates: the three score kernels
only write outputs that every run overwrites completely from the inputs (the
scratch, mass, scores, the LSE partials), so there is nothing to reset
(``reset_to_zero``) or restore (``restore_value``).
"""

from __future__ import annotations

import triton

from .common import prune_for

__all__ = [
    "LSE_CONFIGS",
    "LSE_KEY",
    "LSE_SPLIT",
    "POOL_CONFIGS",
    "POOL_KEY",
    "SMEM_LIMIT",
    "WINDOW_SUM_CONFIGS",
    "WINDOW_SUM_KEY",
    "fit_dot_launch",
    "prune_lse",
    "prune_pool",
    "prune_window_sum",
]

# (BT keys per tile, TPP tiles per program, num_warps, num_stages). The first is the default (serving
# never tunes): the fastest on the H200 at both shapes measured with --tune, 0.422 against 0.442 ms at
# the prefill's 32 window queries (bench/results/kernels_h200_tune/) and 0.298 against 0.351 ms at the
# decode ring's 16 (bench/results/lifetime/h200_aot_suite/); the second was the H100-tuned default.
WINDOW_SUM_CONFIGS = [
    triton.Config({"BT": bt, "TPP": tpp}, num_warps=nw, num_stages=ns)
    for bt, tpp, nw, ns in [
        (64, 16, 4, 3), (64, 16, 8, 4), (64, 8, 4, 2), (64, 8, 4, 3), (64, 8, 4, 4),
        (64, 8, 8, 3), (64, 4, 4, 3), (32, 16, 4, 3), (32, 16, 4, 5), (128, 4, 8, 3),
    ]
]  # fmt: skip
# The LSE pass writes one (max, sum) partial per split of LSE_SPLIT keys into buffers allocated
# before the launch, so every candidate covers the same split: BT * TPS == LSE_SPLIT.
LSE_SPLIT = 1024
LSE_CONFIGS = [
    triton.Config({"BT": bt, "TPS": tps}, num_warps=nw, num_stages=ns)
    for bt, tps, nw, ns in [
        (64, 16, 8, 3), (64, 16, 4, 2), (64, 16, 4, 3), (64, 16, 4, 4), (128, 8, 8, 3), (32, 32, 4, 4),
    ]
]  # fmt: skip
# (BT positions per program, num_warps)
POOL_CONFIGS = [
    triton.Config({"BT": bt}, num_warps=nw)
    for bt, nw in [(256, 4), (128, 4), (512, 4), (512, 8), (1024, 8)]
]  # fmt: skip
# Under the interpreter: one small config each (launch options are ignored there).
_INTERPRETER_WINDOW_SUM = triton.Config({"BT": 32, "TPP": 2})
_INTERPRETER_LSE = triton.Config({"BT": 64, "TPS": LSE_SPLIT // 64})
_INTERPRETER_POOL = triton.Config({"BT": 64})

# Why these autotune keys: serving must never compile or tune after startup, and the engine runs
# every kernel once at startup (``warm_up`` in vllm_kvcomp/engine/: a 2-page scratch pool with the
# served model's head shapes, dtype, block size and pooling). So a key holds only values fixed for
# a served model: group size G, window rows BW, head dim D, block size PAGE, SQUARE, the pooling
# (K, AVG); autotune appends the dtypes of the tensor arguments itself. Never sequence lengths or
# batch sizes (S, NS and the grid are not in it), which would tune again for every new shape. What
# the pruning reads (BM = BG * BW, BD, the cache's element size) is a function of the key.
LSE_KEY = ["G", "BW", "D", "PAGE"]
WINDOW_SUM_KEY = [*LSE_KEY, "SQUARE"]
POOL_KEY = ["G", "K", "AVG"]
SMEM_LIMIT = 200 * 1024  # bytes of shared memory the dot kernels may plan for


def fit_dot_launch(num_warps: int, num_stages: int, BM: int, BT: int, BD: int, esize: int) -> tuple[int, int]:
    """``(num_warps, num_stages)`` of a dot kernel for ``[BT, BD]`` key tiles and ``[BM, BD]`` queries.

    8 warps once the logits tile ``BM * BT`` exceeds 16K elements; fewer
    pipeline stages until the query tile plus one key tile per stage fits in
    ``SMEM_LIMIT`` (the rule of the hand-picked launches before autotune).
    """
    nw = num_warps if BM * BT <= 16384 else max(8, num_warps)
    ns = num_stages
    while ns > 1 and (BM + ns * BT) * BD * esize > SMEM_LIMIT:
        ns -= 1
    return nw, ns


def _fit_dot_config(config: triton.Config, named_args: dict, meta: dict) -> triton.Config:
    esize = named_args["kv_ptr"].element_size()
    nw, ns = fit_dot_launch(config.num_warps, config.num_stages, meta["BM"], config.kwargs["BT"], meta["BD"], esize)
    return triton.Config(dict(config.kwargs), num_warps=nw, num_stages=ns)


prune_window_sum = prune_for(_INTERPRETER_WINDOW_SUM, _fit_dot_config)
prune_lse = prune_for(_INTERPRETER_LSE, _fit_dot_config)
prune_pool = prune_for(_INTERPRETER_POOL)

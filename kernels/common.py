"""Helpers shared by the kernel modules: the interpreter check, the forced-token
mask, and the autotune policy of the Triton kernels.

Autotune policy
---------------
The score-gather kernels are wrapped in ``@triton.autotune`` whose ``key``
holds only values fixed for a model (head dim, group size, window, block size,
pooling, dtypes), so the runtime's one-off warm-up call resolves the config
for every later call and serving never compiles or tunes again. The configs
that autotune may compare are pruned by :func:`prune_for` :

* under ``TRITON_INTERPRET=1`` (CPU CI): one small config, never timed;
* on the GPU, by default: the first candidate (the one tuned on an H100, the
  configuration used before autotune existed), adjusted to the model's shared
  memory by the kernel's ``fit``; nothing is timed. The runtime's warm-up runs
  on a 2-page scratch pool, where timing would pick a config at random;
* with ``VLLM_KVCOMP_AUTOTUNE=1`` (the kernel benchmark's ``--tune``): every
  candidate that fits is timed on the first call of each key; that first call
  must be at a representative size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton

__all__ = ["AUTOTUNE_ENV", "autotune_enabled", "bench_when_tuning", "forced_keep_mask", "interpreting", "prune_for"]

AUTOTUNE_ENV = "VLLM_KVCOMP_AUTOTUNE"


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # pragma: no cover - older triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_keep_mask(seq_lens, length: int, num_sinks: int, num_recent: int) -> torch.Tensor:
    """``[R, length]`` bool: the tokens that eviction always keeps.

    Position ``t`` of row ``r`` is forced when ``t < seq_lens[r]`` and it is an
    attention sink (``t < num_sinks``) or one of the last ``num_recent`` tokens
    (``t >= seq_lens[r] - num_recent``). ``seq_lens``: ``[R]`` tensor (its
    device is the mask's) or a sequence of ints. The one torch implementation,
    used by ``select_keep_indices``, the references and ``vllm_kvcomp.scoring``.
    """
    lens = torch.as_tensor(seq_lens).reshape(-1, 1)
    t = torch.arange(int(length), device=lens.device).view(1, -1)
    return (t < lens) & ((t < num_sinks) | (t >= lens - num_recent))


def autotune_enabled() -> bool:
    """Whether autotune times candidate configs (``VLLM_KVCOMP_AUTOTUNE=1``, never under the interpreter)."""
    return os.environ.get(AUTOTUNE_ENV, "0") == "1" and not interpreting()


FitFn = Callable[[triton.Config, dict, dict], triton.Config]


def prune_for(interpreter_config: triton.Config, fit: FitFn | None = None):
    """An ``early_config_prune`` for ``triton.autotune`` (policy in the module doc).

    ``fit(config, named_args, meta)`` adapts a candidate to the call's fixed
    sizes (e.g. fewer pipeline stages when shared memory is short); candidates
    that become equal are kept once.
    """

    def prune(configs: Sequence[triton.Config], named_args: dict, **meta) -> list[triton.Config]:
        if interpreting():
            return [interpreter_config]
        fitted = [fit(c, named_args, meta) if fit is not None else c for c in configs]
        unique = list(dict.fromkeys(fitted))  # Config hashes its kwargs and launch options
        return unique if autotune_enabled() else unique[:1]

    return prune


def bench_when_tuning(kernel_call, quantiles):
    """``do_bench`` of the autotuned kernels: times only while tuning is on.

    Otherwise the pruning left a single config and there is nothing to
    compare: the kernel is not run (no GPU time at warm-up; under the
    interpreter ``triton.testing.do_bench`` would need CUDA).
    """
    if not autotune_enabled():
        return [0.0] * len(quantiles)
    from triton.testing import do_bench

    return do_bench(kernel_call, quantiles=quantiles)

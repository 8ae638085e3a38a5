"""Host arrays onto the GPU without synchronizing it, on one CPU thread.

`tensor.pin_memory()` copies into pinned memory with torch's parallel CPU copy. Above its grain size
(32,768 elements: an eviction round's page table is [16, 64, ~80]) that wakes torch's OpenMP pool,
whose threads then busy-wait: in bench/results/lifetime/h200_same_batch_cpu/ they used 1.35 s of CPU
in a 3.7 s run, which a shared or CPU-limited host (a Kubernetes pod's quota) pays for. Here numpy
copies into a pinned tensor of the caching host allocator instead, on the calling thread; the
allocator keeps the block until the copy that reads it has run, so the host never rewrites memory
an enqueued copy still reads.
"""

from __future__ import annotations

import numpy as np
import torch


def pinned(array: np.ndarray) -> torch.Tensor:
    """A pinned host copy of `array` (CUDA must be available), made on this thread."""
    source = torch.from_numpy(np.ascontiguousarray(array))  # no copy: for the shape and dtype
    staging = torch.empty_like(source, pin_memory=True)
    np.copyto(staging.numpy(), source.numpy())
    return staging


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """`array` on `device`; on CUDA through a pinned staging copy, without a synchronization."""
    if torch.device(device).type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return pinned(array).to(device, non_blocking=True)


def copy_into(destination: torch.Tensor, array: np.ndarray) -> None:
    """`destination[:len(array)] = array` without a synchronization (a persistent device buffer)."""
    source = pinned(array) if destination.is_cuda else torch.from_numpy(np.ascontiguousarray(array))
    destination[: len(array)].copy_(source, non_blocking=destination.is_cuda)

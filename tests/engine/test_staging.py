"""engine/staging.py: host arrays to the device through a pinned copy made on one thread."""

import numpy as np
import pytest
import torch

from vllm_kvcomp.engine import staging

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Above torch's grain size (32,768 elements), where `tensor.pin_memory()` would copy in parallel.
ARRAYS = [
    np.arange(16 * 64 * 81, dtype=np.int64).reshape(16, 64, 81) * 7 - 5,
    np.arange(40_001, dtype=np.int32)[::-1],  # negative strides: made contiguous
    np.random.default_rng(0).random((3, 5)) > 0.5,
    np.zeros((0, 4), dtype=np.int64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("array", ARRAYS, ids=["pages", "reversed", "bool", "empty"])
def test_to_device_keeps_values_shape_and_dtype(device, array):
    out = staging.to_device(array, device)
    assert out.device.type == device
    assert out.dtype == torch.from_numpy(np.ascontiguousarray(array)).dtype
    assert np.array_equal(out.cpu().numpy(), array)


@pytest.mark.parametrize("device", DEVICES)
def test_copy_into_writes_the_prefix_of_a_persistent_buffer(device):
    buffer = torch.full((10,), -1, dtype=torch.int64, device=device)
    staging.copy_into(buffer, np.array([3, 1, 4], dtype=np.int64))
    assert buffer.tolist() == [3, 1, 4] + [-1] * 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_the_staging_copy_is_pinned_and_never_uses_torchs_parallel_copy(monkeypatch):
    def parallel_copy(self, *args, **kwargs):
        raise AssertionError("Tensor.pin_memory copies on torch's thread pool")

    monkeypatch.setattr(torch.Tensor, "pin_memory", parallel_copy)
    host = staging.pinned(ARRAYS[0])
    assert host.is_pinned()
    assert np.array_equal(host.numpy(), ARRAYS[0])
    staged = [staging.to_device(ARRAYS[0] + k, "cuda") for k in range(3)]  # each its own staging block
    torch.cuda.synchronize()
    assert all(np.array_equal(t.cpu().numpy(), ARRAYS[0] + k) for k, t in enumerate(staged))

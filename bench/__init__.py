"""Benchmarks, run from a checkout (not installed with the plugin); results in bench/results/.

  python -m bench.throughput [...]     vLLM + plugin vs stock vLLM at the same KV memory (GPU)
  python bench/offline.py SPEC RESULT  one engine configuration on one workload (used by the above and the GPU tests)
  python bench/kernels_bench.py        the Triton kernels against torch (GPU)
  python bench/group_overhead.py       scheduler cost of one KV cache group per layer (CPU)

On the lent GPU: bench/device/session.sh (docs/BENCHMARKS.md).
"""

#!/bin/bash
# Call 3 of the 2026-12-02 (third session) lease: set up vLLM, then launch-timed-first:
# job T (alone): tput_paired, kernel_bench_decode; then jobs A (engine) and B (kernel_tests decode_verify
# runtime_gpu serve) sharing GPU 0. Polls until $1 s have passed, then packs parallel.tgz.
set -u
OUTDIR=$OUT
rm -f /tmp/chunks/site.part0.? .device/site.part0.? .device/site.part0
bash .device/scripts/setup-vllm.sh > /tmp/setup.log 2>&1 || tail -5 /tmp/setup.log
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
cd /tmp/src
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > /tmp/gpu.txt 2>&1
nproc >> /tmp/gpu.txt; uptime >> /tmp/gpu.txt
KVCOMP_COMMIT=$(cat COMMIT) bash bench/device/parallel.sh launch-timed-first "tput_paired kernel_bench_decode" "engine" "kernel_tests decode_verify runtime_gpu serve"
mkdir -p /tmp/kvcomp-pack-host && cp /tmp/gpu.txt /tmp/setup.log /tmp/kvcomp-pack-host/
OUT=$OUTDIR bash bench/device/parallel.sh wait "${1:-540}"

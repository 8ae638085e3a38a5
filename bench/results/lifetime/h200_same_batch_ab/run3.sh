#!/bin/bash
# Call 3 of the 2026-12-02 (second) lease: set up vLLM, then the A/B of the same-batch step on this host
# (f201cf4's plugin against main's, twice each: launch-ab, job X), then job Y once X is done: the same
# stage under vLLM's GC debugger at main, then budget 1.0's repeated overhead run. Polls until the time
# given ($1 s) has passed, then packs.
set -u
OUTDIR=$OUT
rm -f /tmp/chunks/site.part0.? .device/site.part0.? .device/site.part0
bash .device/scripts/setup-vllm.sh > /tmp/setup.log 2>&1 || tail -5 /tmp/setup.log
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
rm -rf /tmp/src && cp -r .device/snap /tmp/src
cd /tmp/src
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > /tmp/gpu.txt 2>&1
nproc >> /tmp/gpu.txt; uptime >> /tmp/gpu.txt
bash bench/device/parallel.sh launch-ab "tput_same_batch_cpu" /tmp/src-base /tmp/src /tmp/src-base /tmp/src
C=$(cat /tmp/src/COMMIT)
setsid nohup bash -c "while ! grep -q '^=== done' /tmp/kvcomp-jobs/X.log; do sleep 5; done; \
  cd /tmp/src && KVCOMP_COMMIT=$C WORK=/tmp/kvcomp-work-Y PACK=/tmp/kvcomp-pack-Y KVC=/tmp/kvc-Y TOOLS=/tmp/kvtools-Y \
  OUT=/tmp/kvcomp-out-Y bash bench/device/session.sh install tput_same_batch_gc tput_overhead_repeat" \
  > /tmp/kvcomp-jobs/Y.log 2>&1 < /dev/null &
mkdir -p /tmp/kvcomp-pack-host && cp /tmp/gpu.txt /tmp/setup.log /tmp/kvcomp-pack-host/
OUT=$OUTDIR bash bench/device/parallel.sh wait "${1:-540}"

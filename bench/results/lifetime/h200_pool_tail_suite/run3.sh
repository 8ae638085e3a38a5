#!/bin/bash
# Call 3 of the 2026-12-02 lease: set up vLLM, run the kernel tests and the decode-shape bench at the snapshot
# with pooling at the end of window_sum (.device/snap); if they pass and it is not slower than the separate
# pass, launch the timed stages (alone, first) and the suite from it, else from .device/snapB (the separate pass by default).
set -u
OUTDIR=$OUT
rm -f /tmp/chunks/site.part0.? .device/site.part0.? .device/site.part0
bash .device/scripts/setup-vllm.sh > /tmp/setup.log 2>&1 || tail -5 /tmp/setup.log
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
rm -rf /tmp/src /tmp/srcB && cp -r .device/snap /tmp/src && cp -r /tmp/snapB /tmp/srcB  # snapB came in call 2
cd /tmp/src
KVCOMP_COMMIT=$(cat COMMIT) PACK=/tmp/kvcomp-pack-K WORK=/tmp/kvcomp-work-K OUT=/tmp/kvcomp-out-K \
  bash bench/device/session.sh install kernel_tests kernel_bench_decode 2>&1 | tail -40
PICK=$(python3 - <<'PY'
import json, re
log = open("/tmp/kvcomp-pack-K/logs/kernels_gpu_tests.log").read()
ok = " passed" in log and not re.search(r"\d+ failed|\d+ error", log)
try:
    ks = {k["name"]: k["median_ms"] for k in json.load(open("/tmp/kvcomp-pack-K/results/kernels_decode/kernels.json"))["kernels"]}
    fast = ks["score_gather"] <= ks["score_gather_separate_pool"]
except Exception as e:
    print("no bench:", e, file=__import__("sys").stderr); fast = False
print("/tmp/src" if ok and fast else "/tmp/srcB")
PY
)
echo "PICK $PICK (tests and bench of $(cat /tmp/src/COMMIT))" | tee /tmp/pick.txt
cd "$PICK"
KVCOMP_COMMIT=$(cat COMMIT) bash bench/device/parallel.sh launch-timed-first "tput_same_batch_cpu tput_long" "engine" \
  "decode_verify runtime_gpu serve" > /tmp/launch.log 2>&1
cp /tmp/pick.txt /tmp/kvcomp-pack-K/logs/
OUT=$OUTDIR bash bench/device/parallel.sh wait $((570 - SECONDS))

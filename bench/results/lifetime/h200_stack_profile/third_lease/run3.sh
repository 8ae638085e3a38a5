#!/bin/bash
# Call 3 of the third lease: the sync check, then decode_verify and runtime_gpu at the snapshot.
set -u
OUTDIR=$OUT
rm -f /tmp/chunks/site.part0.? .device/site.part0.? .device/site.part0
bash .device/scripts/setup-vllm.sh > /tmp/setup.log 2>&1 || tail -5 /tmp/setup.log
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
mkdir -p /tmp/kvcomp-pack-host
python3 .device/scripts/sync_check.py 2>&1 | tee /tmp/kvcomp-pack-host/sync_check.log
cd /tmp/src
KVCOMP_COMMIT=$(cat COMMIT) DECODE_K=1 timeout "${1:-200}" bash bench/device/session.sh install decode_verify runtime_gpu 2>&1 | tail -4
cp -r /tmp/kvcomp-pack/. /tmp/kvcomp-pack-host/ 2>/dev/null
tar czf "$OUTDIR/third.tgz" -C /tmp/kvcomp-pack-host .

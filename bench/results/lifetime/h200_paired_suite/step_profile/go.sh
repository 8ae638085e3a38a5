cd /tmp/src
TOOLS=$(sed -n 's/^TOOLS=\${TOOLS:-\(.*\)}$/\1/p' bench/device/session.sh); TOOLS=${TOOLS:-/tmp/kvtools}
export PYTHONPATH=$TOOLS:/tmp/kvc:/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 KVCOMP_COMMIT=a555a88
mkdir -p /tmp/kvcomp-work-P && cd /tmp/kvcomp-work-P
timeout 480 python3 -P -m bench.step_profile --out /tmp/sp/step_profile_same_batch --work /tmp/kvcomp-work-P/profile \
  --case long_generation --budgets 1.0,1024 --output-len 1024 --delay 600 --iterations 256 \
  --kv-cache-memory-bytes 5368709120 --evict-every 128 --method uniform > /tmp/sp/step_profile.log 2>&1
echo "=== done $?" >> /tmp/sp/step_profile.log

#!/bin/bash
# The GPU suite and the hardening runs as three background jobs on a two-GPU machine (nvidia-h200-x2),
# so that they share the lease instead of queueing (device time counts while the machine is held).
#   bash bench/device/parallel.sh launch     install, then start the jobs with setsid (they outlive the call)
#   bash bench/device/parallel.sh wait 500   poll until every job is done or 500 s passed; pack results
# Jobs (each its own WORK and PACK, see session.sh):
#   A  GPU 0      kernel_tests runtime_gpu serve engine     (the GPU suite)
#   B  GPU 1      chaos_tp1, identity_tp1 (sequential)
#   C  GPUs 0+1   chaos_tp2, identity_tp2 (sequential)
# The suite's engines start with vLLM's default gpu_memory_utilization (free memory >= 90%): the chaos
# and identity engines beside them use small explicit KV pools (a few GiB), which leaves that much free.
# Results: $OUT/parallel.tgz holds A/, B/, C/ (results/ and logs/ each) and the job logs; `wait` also
# waits for and packs any other job started with the same conventions (log in $JOBS, PACK=/tmp/kvcomp-pack-X).
set -uo pipefail
OUT=${OUT:-/tmp/kvcomp-out}
JOBS=/tmp/kvcomp-jobs
mkdir -p "$OUT" "$JOBS"
SESSION="bash bench/device/session.sh"

launch() {
  $SESSION install
  job A "CUDA_VISIBLE_DEVICES=0" kernel_tests runtime_gpu serve engine
  job B "CUDA_VISIBLE_DEVICES=1 IDENTITY_K=sequential" chaos_tp1 identity_tp1
  job C "IDENTITY_K=sequential" chaos_tp2 identity_tp2
  sleep 5
  tail -n 2 "$JOBS"/*.log
}

job() {
  local name=$1 env=$2
  shift 2
  env $env WORK=/tmp/kvcomp-work-$name PACK=/tmp/kvcomp-pack-$name OUT=/tmp/kvcomp-out-$name \
    setsid nohup $SESSION "$@" > "$JOBS/$name.log" 2>&1 < /dev/null &
}

wait_jobs() {
  local limit=$1 start=$SECONDS
  while [ $((SECONDS - start)) -lt "$limit" ]; do
    [ "$(grep -l '=== done' "$JOBS"/*.log 2>/dev/null | wc -l)" -ge "$(ls "$JOBS"/*.log | wc -l)" ] && break
    sleep 10
  done
  for f in "$JOBS"/*.log; do echo "## $f"; grep -E "^===|passed|failed|^\[chaos\]" "$f" | cut -c1-400 | tail -n 8; done
  mkdir -p /tmp/kvcomp-bundle
  for pack in /tmp/kvcomp-pack-*; do  # A, B, C and any job started beside them the same way
    name=${pack#/tmp/kvcomp-pack-}
    rm -rf "/tmp/kvcomp-bundle/$name" && cp -r "$pack" "/tmp/kvcomp-bundle/$name"
  done
  cp "$JOBS"/*.log /tmp/kvcomp-bundle/
  tar czf "$OUT/parallel.tgz" -C /tmp/kvcomp-bundle .
}

case "${1:-}" in
  launch) launch ;;
  wait) wait_jobs "${2:-500}" ;;
  *) echo "usage: $0 launch | wait SECONDS" >&2; exit 2 ;;
esac

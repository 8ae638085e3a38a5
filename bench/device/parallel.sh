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
#   bash bench/device/parallel.sh launch-quality    issue #13's layout (below), from a snapshot in /tmp
#   bash bench/device/parallel.sh launch-lifetime   issue #12's layout (below), from a snapshot in /tmp
#   bash bench/device/parallel.sh launch-cohorts    branch decode-cohorts' check (see launch_cohorts)
#   bash bench/device/parallel.sh launch-single     the same check on a one-GPU lease (see launch_single)
#   bash bench/device/parallel.sh launch-shared A B T   checks A and B together on one GPU, then timed T alone
#   bash bench/device/parallel.sh launch-timed-first T A B   timed T alone first, then checks A and B together
#   bash bench/device/parallel.sh launch-ab "STAGES" DIR...   the stages once per snapshot, one after another
#   bash bench/device/parallel.sh stash             copy the carried model parts into /tmp/q (every call)
#   bash bench/device/parallel.sh pieces            the same for 18 MB pieces (see pieces(); the 2026-12-01 lease)
# The lifetime layout (issue #12's evidence and the GPU suite, split over the two GPUs):
#   A  GPU 0      throughput long_generation (stock, 1024, 2048), then kernel_tests runtime_gpu serve engine,
#                 then the 8B shape's long generation (4k output; about 6 minutes, so about 22 in all)
#   B  GPU 1      throughput decode_heavy with lifetime budgets; then, once A's long generation is over
#                 (engine starts beside it slowed its steps in the 2026-12-01 lease), the decode self-check
#                 (both graph modes), decode_smoke, the ring's write in a CUDA graph (ring_cost) and the
#                 decode steps under the torch profiler, stock against the plugin (step_profile: long
#                 generation at 1024, decode-heavy at 1.0 and 0.2): about 22 minutes. Long-output quality
#                 (stage long_output, both real models, GGUF parts carried) is no longer in it: run it
#                 when a change alters which tokens are kept (the plans-ahead branch does not: same plans)
# The quality layout (GGUF parts arrive call by call while the jobs run; each job waits for its parts):
#   Q  GPU 0      quality qwen05 (uniform, zigzag and the candidates), evaluation.pick, then qwen15
#                 (uniform, zigzag, the pick): the calibrate-on-one, check-on-the-other protocol of #13
#   S  GPU 1      the GPU suite and the kernel bench, then layer_share=2 quality (uniform) on both
#                 models once Q has converted each, then the decode-time eviction check (TP=1)
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

CANDIDATES=zigzag,zigzag_shrink50,zigzag_shrink25,zigzag_floor70,zigzag_min05
launch_quality() {
  $SESSION install
  job Q "CUDA_VISIBLE_DEVICES=0" quality_pair
  job S "CUDA_VISIBLE_DEVICES=1 DECODE_K=1" kernel_tests kernel_bench runtime_gpu serve engine quality_share decode_smoke
  sleep 5
  tail -n 2 "$JOBS"/*.log
}

launch_lifetime() {
  $SESSION install
  job A "CUDA_VISIBLE_DEVICES=0" tput_long kernel_tests runtime_gpu serve engine tput_long_8b
  job B "CUDA_VISIBLE_DEVICES=1 DECODE_K=1" tput_decode_lifetime after_tput_long decode_verify decode_smoke ring_cost \
    step_profile
  sleep 5
  tail -n 2 "$JOBS"/*.log
}

# launch-jobs "STAGES OF A" "STAGES OF B": any two stage lists, A on GPU 0 and B on GPU 1 (a short lease)
launch_jobs() {
  $SESSION install
  # shellcheck disable=SC2086  # each argument is a list of stages
  job A "CUDA_VISIBLE_DEVICES=0 DECODE_K=1" $1
  # shellcheck disable=SC2086
  job B "CUDA_VISIBLE_DEVICES=1 DECODE_K=1" $2
  sleep 5
  tail -n 2 "$JOBS"/*.log
}

# The decode-cohorts check (docs/LIFETIME-BUDGETS.md, "The fifth run"): decode-heavy 0.2 first, alone on the
# host; the GPU suite and the batch profiles after it on GPU 0; the self-check, smoke and long-output quality
# (GGUF parts carried meanwhile, `stash`) on GPU 1 once A's decode-heavy run is over. About 20 minutes.
launch_cohorts() {
  $SESSION install
  job A "CUDA_VISIBLE_DEVICES=0" tput_decode_cohorts kernel_tests runtime_gpu serve engine step_profile_batch
  job B "CUDA_VISIBLE_DEVICES=1 DECODE_K=1" after_tput_long decode_verify decode_smoke long_output
  sleep 5
  tail -n 2 "$JOBS"/*.log
}

# The same check on a one-GPU lease (nvidia-h200), in the order that decides the merge: the GPU suite, the
# self-check in both modes, the smoke, long-output quality on both models (GGUF parts carried meanwhile,
# `stash`), then the batch profiles. About 23 minutes; decode-heavy's rerun is left out.
launch_single() {
  $SESSION install
  job A "CUDA_VISIBLE_DEVICES=0 DECODE_K=1" kernel_tests runtime_gpu serve engine decode_verify decode_smoke \
    long_output step_profile_batch
  sleep 5
  tail -n 2 "$JOBS"/*.log
}

# launch-shared "CHECKS A" "CHECKS B" "TIMED": on a one-GPU lease, two lists of correctness stages run at once
# on GPU 0 (the suite's engines start with vLLM's default gpu_memory_utilization 0.9, so the other job must
# hold under 10% of the GPU: the decode self-check's tiny engine and the kernel tests do), then the timed
# stages alone once both are done (stage after_checks), so that nothing shares the GPU or the CPUs with them
launch_shared() {
  $SESSION install
  # shellcheck disable=SC2086  # each argument is a list of stages
  job A "CUDA_VISIBLE_DEVICES=0 DECODE_K=1" $1
  # shellcheck disable=SC2086
  job B "CUDA_VISIBLE_DEVICES=0 DECODE_K=1" $2
  # shellcheck disable=SC2086
  job T "CUDA_VISIBLE_DEVICES=0 DECODE_K=1" after_checks $3
  sleep 5
  tail -n 2 "$JOBS"/*.log
}

# launch-timed-first "TIMED" "CHECKS A" "CHECKS B": the same on a fresh machine's terms: the timed stages
# run first, alone (nothing ran on the host before them), then A and B share GPU 0 (stage after_timed).
# In the 2026-12-01 lease the timed stages that ran after the suite's engines measured the plugin's
# process 1.6x slower op for op; a fresh machine did not (bench/results/lifetime/h200_same_batch_cpu/).
launch_timed_first() {
  $SESSION install
  # shellcheck disable=SC2086  # each argument is a list of stages
  job T "CUDA_VISIBLE_DEVICES=0 DECODE_K=1" $1
  # shellcheck disable=SC2086
  job A "CUDA_VISIBLE_DEVICES=0 DECODE_K=1" after_timed $2
  # shellcheck disable=SC2086
  job B "CUDA_VISIBLE_DEVICES=0 DECODE_K=1" after_timed $3
  sleep 5
  tail -n 2 "$JOBS"/*.log
}

# launch-ab "STAGES" DIR...: the stages once per snapshot directory (each with its COMMIT file), one after
# the other on this host, as one background job X: commits compared on one host, each against the stock
# run of its own invocation. Naming a directory twice (base head base head) measures the spread between
# passes. Each pass installs into its own KVC and packs into /tmp/kvcomp-pack-ab<i>-<commit>. To change
# only the plugin, build the base snapshot from HEAD's tree with vllm_kvcomp/ and kernels/ of the base
# commit (docs/BENCHMARKS.md), so that both passes run the same bench code.
launch_ab() {
  local stages=$1 i=0 dir script=""
  shift
  for dir in "$@"; do
    i=$((i + 1))
    script+="cd $dir && C=\$(cat COMMIT) && echo \"=== ab $i \$C \$(date +%T)\" && KVCOMP_COMMIT=\$C "
    script+="WORK=/tmp/kvcomp-work-ab$i PACK=/tmp/kvcomp-pack-ab$i-\$C KVC=/tmp/kvc-ab$i TOOLS=/tmp/kvtools-ab$i "
    script+="OUT=/tmp/kvcomp-out-ab$i bash bench/device/session.sh install $stages 2>&1 | grep -v '^=== done'; "
  done
  script+="echo \"=== done \$(date +%T)\""
  setsid nohup bash -c "$script" > "$JOBS/X.log" 2>&1 < /dev/null &
  sleep 5
  tail -n 2 "$JOBS"/X.log
}

# Carried files (.device/q05, .device/q15, .device/tok-*, the gguf wheel) into /tmp/q/<key>/, each written
# under a temporary name and renamed, so a job polling for its parts never reads half a file.
stash() {
  local key src f
  for key in qwen05 qwen15; do
    src=.device/q${key#qwen}
    mkdir -p "/tmp/q/$key/tok"
    for f in "$src"/gguf.* .device/tok-"$key"/*; do
      [ -f "$f" ] || continue
      case "$f" in */tok-*) dst=/tmp/q/$key/tok/${f##*/} ;; *) dst=/tmp/q/$key/${f##*/} ;; esac
      [ -f "$dst" ] && cmp -s "$f" "$dst" && continue
      cp "$f" "$dst.tmp" && mv "$dst.tmp" "$dst"
    done
  done
  cp .device/scripts/gguf-*.whl /tmp/q/ 2>/dev/null
  for key in qwen05 qwen15; do echo "$key: $(ls /tmp/q/$key | grep -c part) parts, tok $(ls /tmp/q/$key/tok | wc -l)"; done
}

# GGUF files in pieces small enough to ride beside the working tree (about 11 MB, so a 58 MiB part no
# longer fits a 64 MiB call). Here: `split` each model's parts into 18 MB pieces under .device/split/<key>/
# (gguf.partNNN, a `count` file, the tokenizer in tok/; `parallel.sh split`, run here), then carry three
# pieces per call and run
# `bash /tmp/src/bench/device/parallel.sh pieces` in each. A model's pieces move to /tmp/q/<key> (the
# layout `hf_model` waits for) only once all of them and its tokenizer are here: the tokenizer last,
# because the waiting job counts parts and looks for it.
split_local() {  # here, not on the device: .device/split/<key>/ from .device/q05, .device/q15 and .device/tok-<key>
  local key src
  for key in qwen05 qwen15; do
    src=.device/q${key#qwen}
    rm -rf ".device/split/$key" && mkdir -p ".device/split/$key/tok"
    cat "$src"/gguf.part?? | split -b 18000000 -d -a 3 - ".device/split/$key/gguf.part"
    cp .device/tok-"$key"/* ".device/split/$key/tok/"
    ls ".device/split/$key" | grep -c part > ".device/split/$key/count"
    echo "$key: $(cat ".device/split/$key/count") pieces"
  done
}
pieces() {
  local key stage n want
  for key in qwen05 qwen15; do
    stage=/tmp/stage/$key
    mkdir -p "$stage"
    [ -d ".device/split/$key" ] && cp -rn ".device/split/$key/." "$stage/" 2>/dev/null
    n=$(ls "$stage" | grep -c part)
    want=$(cat "$stage/count" 2>/dev/null)
    if [ -n "$want" ] && [ "$n" = "$want" ] && [ -f "$stage/tok/tokenizer.json" ] && [ ! -f "/tmp/q/$key/tok/tokenizer.json" ]; then
      mkdir -p "/tmp/q/$key"
      mv "$stage"/gguf.part* "/tmp/q/$key/"
      rm -rf "/tmp/q/$key/tok.tmp" && cp -r "$stage/tok" "/tmp/q/$key/tok.tmp"
      rm -rf "/tmp/q/$key/tok" && mv "/tmp/q/$key/tok.tmp" "/tmp/q/$key/tok"
      echo "$key: complete"
    fi
    echo "$key: $n/${want:-?} pieces staged"
  done
  rm -rf .device/split
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
  launch-quality) launch_quality ;;
  launch-lifetime) launch_lifetime ;;
  launch-cohorts) launch_cohorts ;;
  launch-single) launch_single ;;
  launch-jobs) launch_jobs "${2:-}" "${3:-}" ;;
  launch-shared) launch_shared "${2:-}" "${3:-}" "${4:-}" ;;
  launch-timed-first) launch_timed_first "${2:-}" "${3:-}" "${4:-}" ;;
  launch-ab) shift && launch_ab "$@" ;;
  stash) stash ;;
  pieces) pieces ;;
  split) split_local ;;
  wait) wait_jobs "${2:-500}" ;;
  *) echo "usage: $0 launch | launch-quality | launch-lifetime | launch-cohorts | launch-single | launch-jobs A-STAGES B-STAGES | launch-shared A B TIMED | launch-timed-first TIMED A B | launch-ab STAGES DIR... | stash | pieces | split | wait SECONDS" >&2; exit 2 ;;
esac

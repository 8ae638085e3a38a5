#!/bin/bash
# Issue #13: quality of KV compression vs full KV through vLLM on a real model (docs/BENCHMARKS.md).
# Usage on the GPU machine, from the repository root, after `bash bench/device/session.sh install`:
#   OUT=$OUT RESULTS=/tmp/kvcomp-pack/results LOGS=/tmp/kvcomp-pack/logs \
#     bash bench/device/quality.sh qwen05|qwen15 [METHODS]        (METHODS default: uniform,zigzag)
#   bash bench/device/quality.sh status qwen05|qwen15              (a DETACH=1 run: state, log, pack)
# METHODS: method names and preset names of $CONFIG (configs/eval/zigzag-candidates.yaml).
# Reads the GGUF parts /tmp/q/<key>/gguf.part* with /tmp/q/<key>/gguf.sha256 and the tokenizer files
# .device/tok-<key>/ (or /tmp/q/<key>/tok/), converts once to /tmp/<key>-hf (bench/device/qwen_from_gguf.py),
# then runs
#   python3 -P -m evaluation --backend vllm --protocols aware, every task, LENGTHS x DEPTHS x SAMPLES
#   prompts (default 4 x 4 x 5 x 3 = 240), every method at every budget, full KV on the same prompts,
# writing $RESULTS/quality_<key>.{json,md} and plots (after each length), the log $LOGS/quality_<key>.log,
# and copies the JSON, the markdown and quality_<key>.tgz (results, plots, logs) into $OUT.
# Environment (default): GPU_MEM (0.45: another job may share the GPU; CUDA_VISIBLE_DEVICES is left
# as the caller set it), LENGTHS (4096,8192,16384,24576), DEPTHS (0.1,0.3,0.5,0.7,0.9), SAMPLES (3),
# BUDGETS (0.5,0.2,0.1,0.05), TASKS (niah_noise,niah_text,niah_multikey,vt),
# CONFIG (configs/eval/zigzag-candidates.yaml; without it, the methods' defaults and no presets),
# DEADLINE (585: seconds after this script started by which it must have packed its results, under
# the device's 600 s per call; 0: no limit), RESUME (1: keep the rows already in $RESULTS/quality_<key>.json
# and run only the others, so a run cut by the deadline goes on in the next call), EAGER (0),
# DETACH (1: run in the background in a session of its own, which outlives the call while the machine
# is held; no deadline; `status` shows it, WAIT=seconds makes `status` wait for it), DRY_RUN (1: print);
# STATE, TOOLS, KVC (/tmp/kvcomp-quality, /tmp/kvtools, /tmp/kvc): its pid and pack folder, the tool links,
# the installed plugin.
set -uo pipefail
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
ACTION=run
[ "${1:-}" = status ] && { ACTION=status; shift; }
KEY=${1:-}
METHODS=${2:-uniform,zigzag}
case "$KEY" in
  qwen05) MODEL_NAME="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF -> bf16)" ;;
  qwen15) MODEL_NAME="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF -> bf16)" ;;
  *) echo "quality.sh: unknown model key '${KEY}' (qwen05 or qwen15)" >&2; usage ;;
esac
[[ "$METHODS" =~ ^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$ ]] || { echo "quality.sh: bad METHODS '$METHODS'" >&2; usage; }
OUT=${OUT:-/tmp/kvcomp-out}
RESULTS=${RESULTS:-/tmp/kvcomp-pack/results}
LOGS=${LOGS:-/tmp/kvcomp-pack/logs}
DEADLINE=${DEADLINE:-585}
REPO=$(pwd)
CONFIG=${CONFIG:-configs/eval/zigzag-candidates.yaml}
case "$CONFIG" in /*) ;; *) CONFIG="$REPO/$CONFIG" ;; esac
CONFIG_ARGS=(--kv-compression-config "$CONFIG")
[ -f "$CONFIG" ] || { echo "quality.sh: no $CONFIG: the methods' defaults (no presets)" >&2; CONFIG_ARGS=(); }
NAME=${NAME:-quality_$KEY}  # e.g. NAME=quality_qwen05_share2 with CONFIG=configs/eval/layer-share-2.yaml
WORK=/tmp/kvcomp-work
STATE=${STATE:-/tmp/kvcomp-quality}
# session.sh's conventions: the tooling (bench/, evaluation/) through links in /tmp/kvtools, the plugin
# installed in /tmp/kvc, vLLM in /tmp/site, and python3 -P (never the checkout's top-level kernels/).
TOOLS=${TOOLS:-/tmp/kvtools}
KVC=${KVC:-/tmp/kvc}
export PYTHONPATH=$TOOLS:$KVC:/tmp/site:/tmp/gguflib VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
TOK=$REPO/.device/tok-$KEY  # or, where a call copied it there, /tmp/q/<key>/tok
[ -f "$TOK/tokenizer.json" ] || [ ! -f "/tmp/q/$KEY/tok/tokenizer.json" ] || TOK=/tmp/q/$KEY/tok
CONVERT=(python3 -P "$REPO/bench/device/qwen_from_gguf.py" "$KEY" --parts "/tmp/q/$KEY" --tok "$TOK"
  --out "/tmp/$KEY-hf")
EVAL=(python3 -P -m evaluation --backend vllm --model "/tmp/$KEY-hf" --model-name "$MODEL_NAME" --protocols aware
  --tasks "${TASKS:-niah_noise,niah_text,niah_multikey,vt}" --lengths "${LENGTHS:-4096,8192,16384,24576}"
  --depths "${DEPTHS:-0.1,0.3,0.5,0.7,0.9}" --samples "${SAMPLES:-3}" --budgets "${BUDGETS:-0.5,0.2,0.1,0.05}"
  --methods "$METHODS" "${CONFIG_ARGS[@]}" --gpu-memory-utilization "${GPU_MEM:-0.45}" --out "$RESULTS" --name "$NAME")
[ "${RESUME:-1}" = 1 ] && EVAL+=(--resume)
[ "${EAGER:-0}" = 1 ] && EVAL+=(--enforce-eager)

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "convert: $(printf '%q ' "${CONVERT[@]}")"
  echo "evaluate: $(printf '%q ' "${EVAL[@]}")"
  echo "in $WORK, deadline ${DEADLINE}s; results $RESULTS/$NAME.json, log $LOGS/$NAME.log; back in $OUT/$NAME.tgz"
  exit 0
fi

mkdir -p "$OUT" "$WORK" "$RESULTS" "$LOGS" "$TOOLS" "$STATE"
ln -sfn "$REPO/bench" "$TOOLS/bench" && ln -sfn "$REPO/evaluation" "$TOOLS/evaluation"
pack() {  # $OUT: the JSON, the markdown, and <name>.tgz (results, plots, logs: tar xzf it in bench/results)
  local stage=$STATE/$NAME
  rm -rf "$stage" && mkdir -p "$stage"
  cp "$RESULTS/$NAME".* "$RESULTS/${NAME}"_* "$LOGS/$NAME".*log "$LOGS/convert_$KEY.log" "$stage/" 2>/dev/null
  tar czf "$OUT/$NAME.tgz" -C "$STATE" "$NAME"
  cp "$RESULTS/$NAME.json" "$RESULTS/$NAME.md" "$OUT/" 2>/dev/null
  echo "=== packed: $(ls "$OUT" | tr '\n' ' ')($(date +%T), ${SECONDS}s)"
}
running() { [ -f "$STATE/$NAME.pid" ] && kill -0 "$(cat "$STATE/$NAME.pid")" 2>/dev/null; }

if [ "$ACTION" = status ]; then
  while running && [ "$SECONDS" -lt "${WAIT:-0}" ]; do sleep 5; done
  running && echo "=== $NAME running (pid $(cat "$STATE/$NAME.pid"))" || echo "=== $NAME not running"
  grep -vE "it/s|s/it|^INFO|^\(EngineCore" "$LOGS/$NAME.driver.log" 2>/dev/null | tail -"${TAIL:-15}"
  pack
  exit 0
fi
if [ "${DETACH:-0}" = 1 ]; then
  running && { echo "$NAME is already running (pid $(cat "$STATE/$NAME.pid"))"; exit 1; }
  DETACH=0 DETACHED=1 DEADLINE=0 setsid nohup bash "$0" "$KEY" "$METHODS" > "$LOGS/$NAME.driver.log" 2>&1 < /dev/null &
  echo $! > "$STATE/$NAME.pid" && sleep 1
  echo "=== $NAME started in the background (pid $!); 'bash $0 status $KEY' shows it and packs its results"
  exit 0
fi

[ "${DETACHED:-0}" = 1 ] && echo $$ > "$STATE/$NAME.pid"  # this process, whether or not setsid forked
echo "=== quality $KEY ($METHODS) $(date +%T)"
[ -d "$KVC/vllm_kvcomp" ] || { echo "no plugin in $KVC: run 'bash bench/device/session.sh install' first"; exit 3; }
if ! python3 -c "import gguf" 2>/dev/null; then
  wheel=$(ls .device/scripts/gguf-*.whl /tmp/q/gguf-*.whl 2>/dev/null | head -1)
  [ -n "$wheel" ] || { echo "no gguf package and no gguf-*.whl in .device/scripts or /tmp/q"; exit 3; }
  python3 -m pip install -q --no-deps --no-index --target /tmp/gguflib "$wheel" || exit 3
fi
MODEL=$(timeout 300 "${CONVERT[@]}" 2> "$LOGS/convert_$KEY.log") || { tail -5 "$LOGS/convert_$KEY.log"; pack; exit 1; }
echo "model: $MODEL ($(tail -1 "$LOGS/convert_$KEY.log"); ${SECONDS}s)"
LIMIT=$((DEADLINE > 0 ? DEADLINE - SECONDS - 20 : 86400))
if [ "$LIMIT" -lt 60 ]; then echo "only ${LIMIT}s left before the deadline: run again (RESUME)"; pack; exit 4; fi
(cd "$WORK" && timeout -k 15 "$LIMIT" "${EVAL[@]}" 2>&1 | tee "$LOGS/$NAME.log" \
  | { grep -vE "it/s|s/it|^INFO|^\(EngineCore" || true; } | tail -60; exit "${PIPESTATUS[0]}")
rc=$?
[ "$rc" = 124 ] && echo "stopped at the deadline: the lengths finished are in $NAME.json; run again to go on"
pack
exit "$rc"

#!/bin/bash
# GPU session stages for the lent H100 (see ../shared/gpu/README.md for the vLLM bundle).
# Usage on the device, from the repository root, after `bash .device/scripts/setup-vllm.sh`:
#   OUT=/some/dir bash bench/device/session.sh install smoke kernels engine serve
# Every stage logs under $OUT and is time-limited; a failing stage does not stop the next.
set -uo pipefail
export PYTHONPATH=/tmp/kvc:/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvcomp-out}
WORK=/tmp/kvcomp-work
REPO=$(pwd)
mkdir -p "$OUT" "$WORK"
# -P: never import the source tree from the cwd (kernels/ is installed as vllm_kvcomp.kernels)
PY="python3 -P"

stage_install() {
  rm -rf /tmp/kvc && mkdir -p /tmp/kvc
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/kvc . > "$OUT/install.log" 2>&1 \
    || { echo "pip install failed"; tail -20 "$OUT/install.log"; return 1; }
  (cd "$WORK" && $PY -c "import vllm, torch, triton, vllm_kvcomp.kernels; from importlib.metadata import entry_points; \
print('vllm', vllm.__version__, 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name()); \
print([e.value for e in entry_points(group='vllm.general_plugins')])")
}

stage_smoke() {
  (cd "$WORK" && timeout 300 $PY "$REPO/bench/device/smoke.py" 2>&1 | tee "$OUT/smoke.log" | grep -E "SMOKE|Error|error|Traceback" | tail -30)
}

stage_kernels() {
  timeout 300 $PY -m pytest -m gpu tests/kernels tests/engine/test_page_tables.py -q -p no:cacheprovider 2>&1 | tee "$OUT/kernels_gpu_tests.log" | tail -8
  timeout 240 $PY bench/kernels_bench.py --out "$OUT" 2>&1 | tee "$OUT/kernels_bench.log" | tail -25
}

stage_engine() {
  KVCOMP_RESULTS_DIR="$OUT" KVCOMP_WORK_DIR="$WORK" timeout 560 $PY -m pytest -m gpu tests/engine/test_engine_gpu.py \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/engine_gpu_tests.log" | tail -30
  cp "$WORK"/logs/*.log "$OUT/" 2>/dev/null || true
}

stage_serve() {
  (cd "$WORK" && vllm serve --help 2>&1 | grep -- "--kv-compression" > "$OUT/serve_help.txt"; cat "$OUT/serve_help.txt")
  KVCOMP_RESULTS_DIR="$OUT" KVCOMP_WORK_DIR="$WORK" timeout 500 $PY -m pytest -m gpu tests/engine/test_serve_gpu.py \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/serve_gpu_tests.log" | tail -30
  cp "$WORK/serve.log" "$OUT/" 2>/dev/null || true
}

for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  "stage_$stage"
done
echo "=== done $(date +%T)"

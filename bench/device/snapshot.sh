#!/bin/bash
# A snapshot of the tree for the device: `git archive` of HEAD without bench/results, plus a COMMIT file
# (the device's copy of the tree has no reliable .git; session.sh records KVCOMP_COMMIT from it).
#   bash bench/device/snapshot.sh .device/snap            HEAD
#   bash bench/device/snapshot.sh .device/snap-base BASE  HEAD's tree with BASE's plugin (vllm_kvcomp/ and
#                                                         kernels/), COMMIT "<base>-plugin": an A/B of the
#                                                         plugin alone, the bench code the same on both sides
set -euo pipefail
dest=$1
base=${2:-}
rm -rf "$dest" && mkdir -p "$dest"
git archive HEAD | tar -x -C "$dest" --exclude=bench/results
commit=$(git rev-parse --short HEAD)
if [ -n "$base" ]; then
  rm -rf "$dest/vllm_kvcomp" "$dest/kernels"
  git archive "$base" vllm_kvcomp kernels | tar -x -C "$dest"
  commit="$(git rev-parse --short "$base")-plugin"
fi
echo "$commit" > "$dest/COMMIT"
echo "$dest: $commit, $(du -sh "$dest" | cut -f1)"

#!/usr/bin/env bash
# The step comparison: the ResNet-18 train step of `sdp bench step` next to PyTorch's, same machine, one
# run, median of 7 steps after 2 warm-up steps. Prints each side's last line per configuration.
#   scripts/compare_step.sh [DEVICE]      DEVICE: cpu (default) or cuda:0
# SDP=path/to/sdp (default target/release/sdp), PY=python with torch (default ~/.cache/sdp-torch/bin/python).
set -euo pipefail
DEV=${1:-cpu}
SDP=${SDP:-target/release/sdp}
PY=${PY:-$HOME/.cache/sdp-torch/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
configs=("--batch 32" "--batch 128" "--batch 128 --widths 16,32,64,128")
for c in "${configs[@]}"; do
  # shellcheck disable=SC2086
  if [[ $c == *--widths* ]]; then model="--model resnet --depths 2,2,2,2"; else model="--model resnet18"; fi
  ours=$($SDP bench step $model $c --device "$DEV" --steps 7 --warmup 2 2>/dev/null | tail -1)
  theirs=$($PY "$HERE/pytorch_step.py" $c --device "$DEV" --steps 7 --warmup 2 2>/dev/null | tail -1)
  printf '%-34s sdp:     %s\n%-34s pytorch: %s\n' "$c" "$ours" "" "$theirs"
done

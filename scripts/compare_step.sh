#!/usr/bin/env bash
# The step comparison: the CIFAR ResNet-18 train step (and the tiny decoder's, `llama_tiny` at a vocabulary
# of 2,048 and 128-token sequences) of `sdp bench step` next to PyTorch's
# (scripts/pytorch_step.py), same machine, one run, median of 7 steps after 2 warm-up steps, at 2 threads
# and at 1 thread. Prints one row per configuration and thread count: each side's step time and peak
# memory, and the ratio PyTorch time / sdp time (>= 1.0: sdp is at least as fast). A run of T threads is
# confined to the first T cores (taskset), so that "1 thread" means one core for both sides: sdp's main
# thread hands work to rayon's worker, and unconfined the two ping-pong between cores (a width-16 step
# at batch 64 took 0.36 s unconfined against 0.23 s on one core; PyTorch 0.19 s against 0.17 s).
#   scripts/compare_step.sh [DEVICE]      DEVICE: cpu (default) or cuda:0 (threads then do not apply)
# SDP=path/to/sdp (default target/release/sdp), PY=python with torch (default ~/.cache/sdp-torch/bin/python),
# THREADS="2 1" (the thread counts), STEPS=7, WARMUP=2, CONFIGS="name|flags;..." to run other rows,
# REPEAT=2: each side runs REPEAT times, alternating, and reports its lowest median (on a machine whose speed
# drifts, the least disturbed run of each side).
set -euo pipefail
DEV=${1:-cpu}
SDP=${SDP:-target/release/sdp}
PY=${PY:-$HOME/.cache/sdp-torch/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
STEPS=${STEPS:-7}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2 1}
REPEAT=${REPEAT:-2}
[[ $DEV == cpu ]] || THREADS=${THREADS%% *}
DEFAULT_CONFIGS="resnet18 b32|--batch 32;resnet18 b128|--batch 128;w16 b64|--widths 16,32,64,128 --batch 64;\
w16 b128|--widths 16,32,64,128 --batch 128;w32 b64|--widths 32,64,128,256 --batch 64;\
llama_tiny b16|--context 128 --classes 2048 --batch 16"
IFS=';' read -r -a configs <<< "${CONFIGS:-$DEFAULT_CONFIGS}"
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }
printf '%-14s %-7s %10s %10s %9s %9s %8s\n' config threads "sdp s" "torch s" "sdp MB" "torch MB" "torch/sdp"
for t in $THREADS; do
  for c in "${configs[@]}"; do
    name=${c%%|*}; flags=${c#*|}
    if [[ $flags == *--context* ]]; then model="--model llama_tiny"; tmodel="--model llama_tiny"
    elif [[ $flags == *--widths* ]]; then model="--model resnet --depths 2,2,2,2"; tmodel=""
    else model="--model resnet18"; tmodel=""; fi
    pin=(); [[ $DEV == cpu ]] && command -v taskset >/dev/null && pin=(taskset -c "0-$((t - 1))")
    ours=""; theirs=""
    for _ in $(seq "$REPEAT"); do
      # shellcheck disable=SC2086
      o=$(RAYON_NUM_THREADS=$t "${pin[@]}" $SDP bench step $model $flags --device "$DEV" --steps "$STEPS" --warmup "$WARMUP" 2>/dev/null | tail -1)
      # shellcheck disable=SC2086
      p=$("${pin[@]}" $PY "$HERE/pytorch_step.py" $tmodel $flags --device "$DEV" --threads "$t" --steps "$STEPS" --warmup "$WARMUP" 2>/dev/null | tail -1)
      ours=$(printf '%s\n%s\n' "$ours" "$o" | { grep step_s || true; } | sort -t= -k2 -g | head -1)
      theirs=$(printf '%s\n%s\n' "$theirs" "$p" | { grep step_s || true; } | sort -t= -k2 -g | head -1)
    done
    s_ours=$(field step_s <<< "$ours"); s_theirs=$(field step_s <<< "$theirs")
    ratio=$(awk -v a="$s_theirs" -v b="$s_ours" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    printf '%-14s %-7s %10s %10s %9s %9s %8s\n' "$name" "$t" "$s_ours" "$s_theirs" \
      "$(field peak_mb <<< "$ours")" "$(field peak_mb <<< "$theirs")" "$ratio"
  done
done

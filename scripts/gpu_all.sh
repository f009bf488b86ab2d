#!/usr/bin/env bash
# Every GPU check of the suite in one call (a GPU machine's time is short): the training-step comparison with
# PyTorch (gpu_step.sh), SDP's per-worker memory (gpu_sdp_memory.sh), the NCCL collectives (gpu_nccl.sh) and
# the 134 M decoder's step beside PyTorch's (gpu_llm.sh),
# each under its own time limit, logs under $OUT. Needs target-gpu/sdp.xz and target-gpu/cuda_ops.xz, which
# scripts/gpu_build.sh makes on a machine with cargo (the GPU machine has none).
#   OUT=dir scripts/gpu_all.sh
set -u
export OUT=${OUT:-/tmp/sdp-gpu}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
for s in gpu_nccl gpu_step gpu_sdp_memory gpu_llm; do
  limit=$([ $s = gpu_sdp_memory ] && echo 240 || echo 200)
  echo "===== $s (limit ${limit} s) ====="
  start=$(date +%s)
  timeout $limit bash scripts/$s.sh 2>&1 | tee "$OUT/$s.log"
  echo "===== $s: rc=${PIPESTATUS[0]}, $(( $(date +%s) - start )) s ====="
done

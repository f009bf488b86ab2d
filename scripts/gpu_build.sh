#!/usr/bin/env bash
# Builds what scripts/gpu_all.sh ships to a GPU machine, here, without a GPU: the CUDA toolchain from PyPI
# wheels (scripts/cuda-toolchain.sh), then `sdp` with cuDNN and NCCL (add MPI with GPU_FEATURES=cudnn,nccl,mpi
# where the GPU machine has Open MPI) and the CUDA op parity tests, compressed into target-gpu/ (git-ignored).
# ~30 min on 2 busy cores the first time (nvcc compiles candle's kernels), a minute or two after a change.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fetch >/dev/null
source <(bash scripts/cuda-toolchain.sh)
FEATURES=${GPU_FEATURES:-cudnn,nccl}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-gpu}
cargo build --release --features "$FEATURES"
ops=$(cargo test --release --features "$FEATURES" --no-run --test cuda_ops --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*cuda_ops-[^"]*"' | head -1 | cut -d'"' -f4)
mkdir -p target-gpu
xz -6 -T2 -c "$CARGO_TARGET_DIR/release/sdp" > target-gpu/sdp.xz
[ -n "$ops" ] && xz -6 -T2 -c "$ops" > target-gpu/cuda_ops.xz
ls -la target-gpu/*.xz

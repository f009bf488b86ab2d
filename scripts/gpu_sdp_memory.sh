#!/usr/bin/env bash
# SDP's per-worker memory and step time on a GPU: one worker's physical subnetwork (worker 0 of K = 4)
# against the full model (a DP worker), CIFAR ResNet-18 / WRN-18 at batch 128, fp32, on the same card in
# one run (`sdp bench step`; CUDA memory is the device memory in use sampled after each backward pass).
# Needs the CUDA build shipped as target-gpu/sdp.xz (scripts/cuda-toolchain.sh, then
# `cargo build --release --features cuda` with CARGO_TARGET_DIR=target-gpu and `xz -6`).
set -u
xz -dc target-gpu/sdp.xz > /tmp/sdp && chmod +x /tmp/sdp
SP=${SP:-/opt/torch/.venv/lib/python3.12/site-packages}
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:$SP/nvidia/nccl/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for model in resnet18 wrn18; do
  for cfg in "" "--masking block --coverage 0.5 --workers 4" "--masking neuron --coverage 0.5 --workers 4" \
             "--masking block --coverage 0.75 --workers 4"; do
    # shellcheck disable=SC2086
    line=$(timeout 60 /tmp/sdp bench step --model $model --batch 128 --device cuda:0 --steps 5 --warmup 2 $cfg 2>&1 | tail -1)
    printf '%-8s %-45s %s\n' "$model" "${cfg:-full model (DP worker)}" "$line"
  done
done

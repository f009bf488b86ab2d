#!/usr/bin/env bash
# SDP's per-worker memory and step time on a GPU: every worker's physical subnetwork (K = 4) against the
# full model (a DP worker), CIFAR ResNet-18 / WRN-18 at batch 128, fp32, on the same card in one run
# (`sdp bench step`; CUDA memory is the device memory in use sampled after each backward pass, a lower
# bound). Prints one line per worker and the mean over workers.
# Needs the CUDA build shipped as target-gpu/sdp.xz (source <(bash scripts/cuda-toolchain.sh), then
# `CARGO_TARGET_DIR=target-gpu cargo build --release --features cuda` and `xz -6`).
set -u
xz -dc target-gpu/sdp.xz > /tmp/sdp && chmod +x /tmp/sdp
SP=${SP:-/opt/torch/.venv/lib/python3.12/site-packages}
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:$SP/nvidia/nccl/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
bench() { timeout 60 /tmp/sdp bench step --batch 128 --device cuda:0 --steps 5 --warmup 2 "$@" 2>&1 | tail -1; }
for model in resnet18 wrn18; do
  printf '%-8s %-28s %s\n' "$model" "full model (DP worker)" "$(bench --model $model)"
  for cfg in "block 0.5" "block_act 0.5" "neuron 0.5" "block 0.75"; do
    set -- $cfg
    lines=""
    for w in 0 1 2 3; do
      l=$(bench --model $model --masking "$1" --coverage "$2" --workers 4 --worker $w)
      printf '%-8s %-28s %s\n' "$model" "$1 C=$2 worker $w" "$l"
      lines+="$l"$'\n'
    done
    printf '%s' "$lines" | awk -v m="$model" -v c="$1 C=$2 mean of 4" -F'[= ]' \
      '/step_s/ {s+=$2; p+=$6; n++} END {if (n) printf "%-8s %-28s step_s=%.4f peak_mb=%.1f\n", m, c, s/n, p/n}'
  done
done

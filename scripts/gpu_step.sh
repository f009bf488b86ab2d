#!/usr/bin/env bash
# The training-step comparison on a GPU machine without a Rust toolchain: the CUDA build of `sdp` (shipped as target-gpu/sdp.xz,
# built with scripts/cuda-toolchain.sh) and scripts/pytorch_step.py, ResNet-18 train step at batch 128, on
# the same card in the same run (after the cuDNN conv2d parity test, where target-gpu/cuda_ops.xz is shipped).
# Prints each side's last line at the end.
#   OUT=dir scripts/gpu_step.sh        (OUT: where the full logs go; default /tmp)
set -u
OUT=${OUT:-/tmp}
xz -dc target-gpu/sdp.xz > /tmp/sdp && chmod +x /tmp/sdp
SP=${SP:-/opt/torch/.venv/lib/python3.12/site-packages}
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:$SP/nvidia/nccl/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
PY=${PY:-/opt/torch/.venv/bin/python}; [ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# With --features cudnn: first the parity of the fused CUDA batch norm (against the CPU f32 op) and of the cuDNN
# conv2d (forward and both gradients against candle's own
# conv, tests/cuda_ops.rs), shipped as target-gpu/cuda_ops.xz (the test binary that
# `CARGO_TARGET_DIR=target-gpu cargo test --release --features cudnn --no-run` prints for tests/cuda_ops.rs).
if [ -f target-gpu/cuda_ops.xz ]; then
  xz -dc target-gpu/cuda_ops.xz > /tmp/cuda_ops && chmod +x /tmp/cuda_ops
  timeout 240 /tmp/cuda_ops --test-threads 1 >"$OUT/cuda_ops.txt" 2>&1
  echo "cuda_ops parity rc=$?"; grep -E "^test |panicked|differs|skipping" "$OUT/cuda_ops.txt" | head -n 40
fi
timeout 150 /tmp/sdp bench step --model resnet18 --batch 128 --device cuda:0 --steps 7 --warmup 3 >"$OUT/sdp.txt" 2>&1
echo "sdp rc=$?"
timeout 90 /tmp/sdp bench step --model resnet18 --batch 128 --device cuda:0 --steps 7 --warmup 3 --precision bf16 \
  >"$OUT/sdp_bf16.txt" 2>&1
echo "sdp bf16 rc=$?"
timeout 60 "$PY" scripts/pytorch_step.py --batch 128 --device cuda:0 --steps 7 --warmup 3 >"$OUT/torch.txt" 2>&1
echo "torch rc=$?"
timeout 60 "$PY" scripts/pytorch_step.py --batch 128 --device cuda:0 --steps 7 --warmup 3 --channels-last \
  >"$OUT/torch_cl.txt" 2>&1
echo "torch channels_last rc=$?"
echo "== sdp fp32 (cuDNN conv, CUDA BN) =="; tail -n 4 "$OUT/sdp.txt"
echo "== sdp bf16 =="; tail -n 2 "$OUT/sdp_bf16.txt"
echo "== pytorch eager fp32 =="; tail -n 2 "$OUT/torch.txt"
echo "== pytorch eager fp32 channels_last =="; tail -n 2 "$OUT/torch_cl.txt"

#!/usr/bin/env bash
# The NCCL collectives on a GPU machine without a Rust toolchain (the `nccl` build shipped as target-gpu/sdp.xz,
# made by scripts/gpu_build.sh; GPU_FEATURES=cudnn,nccl,mpi there for the multi-GPU part, which needs Open MPI's
# libmpi on the GPU machine).
#  1. One rank: `sdp bench comm --device cuda` makes an NCCL communicator on the GPU, times the grouped
#     averager (at one rank nothing crosses a wire) and checks NCCL's all-reduce of the whole model against
#     the expected sum (the "check:" line; a wrong sum fails the command).
#  2. One rank: a short SDP training run on the GPU (the simulation of K = 4 workers), end to end.
#  3. Two or more GPUs and an `mpirun`: the same bench over N ranks (one GPU each), and the equivalence of an
#     SDP run over N ranks (NCCL sums) with the one-process run: largest parameter difference of the final
#     models (tests/mpi.rs asks < 1e-5 on CPU ranks).
#   OUT=dir scripts/gpu_nccl.sh        (OUT: where the full logs go; default /tmp)
set -u
OUT=${OUT:-/tmp}
xz -dc target-gpu/sdp.xz > /tmp/sdp && chmod +x /tmp/sdp
SP=${SP:-/opt/torch/.venv/lib/python3.12/site-packages}
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:$SP/nvidia/nccl/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export SDP_NCCL_TIMEOUT_S=${SDP_NCCL_TIMEOUT_S:-60}
PY=${PY:-/opt/torch/.venv/bin/python}; [ -x "$PY" ] || PY=python3
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1
echo "GPUs: $NGPU"

timeout 120 /tmp/sdp bench comm --device cuda --model resnet18 --masking block --coverage 0.5 --workers 4 --syncs 10 \
  >"$OUT/nccl_bench1.txt" 2>&1
echo "bench comm, 1 rank, NCCL: rc=$?"; cat "$OUT/nccl_bench1.txt"

SHORT=(--set workload.epochs=1 --set workload.train_samples=512 --set workload.test_samples=256 --set method.kind=sdp
       --set method.masking=block --set method.coverage=0.5)
timeout 180 /tmp/sdp run experiments/demo_sdp.toml "${SHORT[@]}" --device cuda --results-dir "$OUT/one" --save-model \
  --no-memprobe >"$OUT/nccl_run1.txt" 2>&1
echo "SDP run on the GPU, 1 process: rc=$?"; tail -n 3 "$OUT/nccl_run1.txt"

if [ "$NGPU" -ge 2 ] && command -v mpirun >/dev/null; then
  N=2
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  timeout 120 mpirun -np $N -x LD_LIBRARY_PATH -x SDP_NCCL_TIMEOUT_S /tmp/sdp bench comm --device cuda --model resnet18 \
    --masking block --coverage 0.5 --workers 4 --syncs 10 >"$OUT/nccl_bench$N.txt" 2>&1
  echo "bench comm, $N ranks, NCCL: rc=$?"; cat "$OUT/nccl_bench$N.txt"
  timeout 240 mpirun -np $N -x LD_LIBRARY_PATH -x SDP_NCCL_TIMEOUT_S /tmp/sdp run experiments/demo_sdp.toml "${SHORT[@]}" \
    --device cuda --results-dir "$OUT/spread" --save-model --no-memprobe >"$OUT/nccl_run$N.txt" 2>&1
  echo "SDP run over $N GPU ranks: rc=$?"; tail -n 3 "$OUT/nccl_run$N.txt"
  "$PY" - "$OUT/one" "$OUT/spread" <<'EOF'
import sys, glob
from safetensors.numpy import load_file
a, b = (load_file(glob.glob(f"{d}/**/model.safetensors", recursive=True)[0]) for d in sys.argv[1:3])
diff = max(float(abs(a[k].astype("f8") - b[k].astype("f8")).max()) for k in a)
print(f"equivalence: {len(a)} tensors, largest parameter difference {diff:.2e} ({'ok' if diff < 1e-4 else 'TOO LARGE'})")
EOF
else
  echo "multi-GPU part skipped: $NGPU GPU(s), mpirun $(command -v mpirun >/dev/null && echo present || echo absent)"
fi

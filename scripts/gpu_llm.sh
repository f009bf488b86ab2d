#!/usr/bin/env bash
# The decoder on a GPU: one training step of llama_134m (vocabulary 32,000, 256-token
# sequences, 64 per worker: the paper spec's per-worker batch) for DP and for one SDP worker of block masking at
# C = 0.5 (K = 8), each step's time and peak device memory, beside PyTorch's (transformers' LlamaForCausalLM,
# eager attention, scripts/pytorch_step.py --model llama_134m) on the same card in the same run.
#   OUT=dir scripts/gpu_llm.sh        (needs target-gpu/sdp.xz from scripts/gpu_build.sh)
set -u
OUT=${OUT:-/tmp}
[ -x /tmp/sdp ] || { xz -dc target-gpu/sdp.xz > /tmp/sdp && chmod +x /tmp/sdp; }
SP=${SP:-/opt/torch/.venv/lib/python3.12/site-packages}
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:$SP/nvidia/nccl/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
PY=${PY:-/opt/torch/.venv/bin/python}; [ -x "$PY" ] || PY=python3
ARGS="--model llama_134m --context 256 --classes 32000 --batch 64 --device cuda:0 --steps 5 --warmup 2"
timeout 120 /tmp/sdp bench step $ARGS >"$OUT/llm_dp.txt" 2>&1; echo "sdp dp rc=$?"
timeout 90 /tmp/sdp bench step $ARGS --masking block --coverage 0.5 --workers 8 >"$OUT/llm_sdp.txt" 2>&1
echo "sdp block C=0.5 worker rc=$?"
if "$PY" -c "import transformers" 2>/dev/null; then
  timeout 90 "$PY" scripts/pytorch_step.py --model llama_134m --context 256 --classes 32000 --batch 64 \
    --device cuda:0 --steps 5 --warmup 2 >"$OUT/llm_torch.txt" 2>&1; echo "torch rc=$?"
else
  echo "transformers is not installed for $PY: no PyTorch side" >"$OUT/llm_torch.txt"
fi
echo "== sdp llama_134m DP step =="; tail -n 2 "$OUT/llm_dp.txt"
echo "== sdp llama_134m SDP block C=0.5 worker step =="; tail -n 2 "$OUT/llm_sdp.txt"
echo "== pytorch llama_134m step =="; tail -n 2 "$OUT/llm_torch.txt"

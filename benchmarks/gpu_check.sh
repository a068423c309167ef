#!/usr/bin/env bash
# One GPU session's worth of checks (under 8 minutes on one GPU): the CUDA tests, the PESC
# layer benchmark, and a serving benchmark of Camelidae-8x7B-shaped random weights.
# Figures go to ${OUT:-benchmarks/results/gpu}/ (gpu_check.log, moe_layer.txt, serving JSON).
#
#   bash benchmarks/gpu_check.sh            # on a machine with CUDA and this repo's deps
# On the lent device machine, carry missing wheels as its README shows (fastapi, uvicorn,
# sse-starlette, gguf, bitsandbytes, safetensors, prometheus_client, llguidance, openai, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
device="${DEVICE:-cuda}"        # DEVICE=cpu SHAPE=small rehearses the script on a CPU machine
shape="${SHAPE:-camelidae-8x7b}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log="$out/gpu_check.log"
{
  echo "== $(date -u) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  echo "== CUDA tests"
  timeout 240 "$py" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15
  echo "== PESC layer benchmark (bf16)"
  dims=$([ "$device" = cuda ] && echo small,camelidae-8x7b || echo small)
  timeout 150 "$py" -m benchmarks.bench_moe_layer --device "$device" --dims "$dims" 2>&1 | tee "$out/moe_layer.txt" | tail -14
  echo "== serving: $shape shapes, random weights"
  "$py" -m benchmarks.shaped_model "$shape" "/tmp/$shape" >/dev/null
  "$py" -m pesc_serve --model "/tmp/$shape" --load-format dummy --device "$device" --port 8300 --max-model-len 2048 \
      --max-num-batched-tokens 2048 > "$out/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 120); do curl -sf localhost:8300/health >/dev/null && break; sleep 1; done
  grep -E "pesc_serve: (model|PESC|dtype|KV)" "$out/server.log"
  timeout 180 "$py" -m benchmarks.bench_serving --base-url http://127.0.0.1:8300/v1 --label "pesc-serve-$device-$shape" \
      --concurrency 1,16,64 --max-tokens 128 --out "$out/serving_$shape.json" 2>&1 | tail -8
  kill -TERM $pid; wait $pid
} 2>&1 | tee "$log"

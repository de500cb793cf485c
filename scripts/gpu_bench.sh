#!/usr/bin/env bash
# GPU decode fast path: correctness + timing in one call per phase, on the device machine.
#
#   bash scripts/gpu_bench.sh pythia   # Pythia-2.8B shapes, window 2048: main bench (graphs)
#                                      # with the eager check, profile, prompt sweep, HF peers,
#                                      # variants, and window 512
#   bash scripts/gpu_bench.sh real     # SmolLM2 (real weights) graphed vs eager, 300 tokens;
#                                      # windows 1024 and 4096; CUDA pytest
#
# Writes JSON records, traces and a log under $OUT (default /tmp/fd-out) and prints a short
# table last. Carried files (see docs/gpu.md): .carry/gguf.a (pythia call) and .carry/gguf.b
# (real call) are halves of the bundled SmolLM2 GGUF, joined in /tmp/fd (kept while the
# machine stays warm); .carry/whl holds the gguf wheel; .carry/tok the tokenizer cache.
set -uo pipefail
PHASE=${1:-pythia}
OUT=${OUT:-/tmp/fd-out}
mkdir -p "$OUT" /tmp/fd
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/fd/inductor TRITON_CACHE_DIR=/tmp/fd/triton
export PYTHONPATH=$PWD/src
LOG=$OUT/log-$PHASE.txt
exec > >(tee -a "$LOG") 2>&1
date
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv,noheader || true
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers",
  transformers.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'

# carried files
for part in a b; do [ -f .carry/gguf.$part ] && cp .carry/gguf.$part /tmp/fd/; done
if [ -d .carry/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
[ -d .carry/tok ] && export FASTDECODE_CACHE=$PWD/.carry/tok

BENCH=(python3 -m fastdecode.cli bench --model pythia-2.8b --random-weights --dtype bfloat16
       --device cuda --sink 4 --compile graphs)

if [ "$PHASE" = pythia ]; then
  timeout 560 "${BENCH[@]}" --window 2048 --prompt-len 4096 --decode-len 256 --warmup-tokens 32 \
    --check 16 --profile "$OUT/trace-graphs.json.gz" --profile-steps 5 \
    --sweep-prompts 128,512,1024,2048,4096,8192 --sweep-decode-len 96 --sweep-warmup-tokens 16 \
    --peers hf-eager,hf-static-compile --peer-decode-len 64 --peer-warmup-tokens 8 \
    --variants default,none,graphs:extern \
    --sweep-windows 512 \
    --target-tpot-ms 2.4 --target-vs-static 2 --target-vs-eager 30 \
    --json "$OUT/h100-pythia-bench.json"
  echo "bench rc=$?"
elif [ "$PHASE" = real ]; then
  if [ -f /tmp/fd/gguf.a ] && [ -f /tmp/fd/gguf.b ]; then
    cat /tmp/fd/gguf.a /tmp/fd/gguf.b > /tmp/fd/smollm2.gguf
    echo "gguf sha256 $(sha256sum /tmp/fd/smollm2.gguf | cut -d' ' -f1) expected $(cat .carry/gguf.sha256 2>/dev/null)"
    timeout 260 python3 scripts/gpu_real_check.py --model /tmp/fd/smollm2.gguf --tokens 300 \
      --dtypes bfloat16 --json "$OUT/h100-real-check.json"
    echo "real check rc=$?"
  else
    echo "SKIP real check: /tmp/fd lacks a gguf half (the machine was not warm?)"
  fi
  timeout 270 "${BENCH[@]}" --window 1024 --prompt-len 1028 --decode-len 96 --warmup-tokens 16 \
    --sweep-windows 4096 --sweep-decode-len 96 --sweep-warmup-tokens 16 \
    --json "$OUT/h100-pythia-windows.json"
  echo "window sweep rc=$?"
  timeout 60 python3 -m pytest -q -m gpu tests/test_compile.py -p no:cacheprovider -k triton
  echo "pytest gpu rc=$?"
else
  echo "unknown phase $PHASE" && exit 2
fi
ls -la "$OUT"
date

#!/usr/bin/env bash
# One lease, three back-to-back calls (the machine is released 30 s after a call; the GGUF
# halves live in /tmp/fd only while it stays warm). Run from the repository root:
#   call 1 (carry .carry/gguf.00 .carry/whlmin: the gguf wheel): bash experiments/h200_eviction_lease.sh one
#     the parallel-evaluator diagnosis (experiments/gpu_parallel_diag.py), TPOT of the
#     eviction policies (scripts/eviction_tpot.py), int8 KV vs bf16 KV at 4+4096 (#22)
#   call 2 (carry .carry/gguf.01): ... two     the eviction study, fp32 first (resumable)
#   call 3 (no carry):             ... three   the study resumed: bf16, recompute, token check
# Records accumulate in /tmp/fd/ev; each call returns all of them in one tar under $OUT.
set -uo pipefail
STEP=$1
OUT=${OUT:-/tmp/fd-out}
EV=/tmp/fd/ev
mkdir -p "$OUT" "$EV" /tmp/fd
cp -n perf/results/h200-eviction-pg19-*.json "$EV"/ 2>/dev/null || true  # resume: done ones skipped
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/fd/triton TORCHINDUCTOR_CACHE_DIR=/tmp/fd/inductor
export PYTHONPATH=$PWD/src FASTDECODE_CACHE=/tmp/fd/cache
[ -f .carry/commit ] && export FASTDECODE_GIT_COMMIT=$(cat .carry/commit)
for part in 00 01; do [ -f .carry/gguf.$part ] && cp .carry/gguf.$part /tmp/fd/; done
if [ -d .carry/whlmin ] || [ -d /tmp/site ]; then
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whlmin/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH
fi
exec > >(tee -a "$OUT/log-$STEP.txt") 2>&1
date; nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
BENCH=(python3 -m fastdecode.cli bench --model pythia-2.8b --random-weights --dtype bfloat16
       --device cuda --sink 4 --compile graphs)
if [ "$STEP" = one ]; then
  timeout 80 env PYTHONPATH=$PYTHONPATH:scripts python3 experiments/gpu_parallel_diag.py --device cuda
  echo "diag rc=$?"
  timeout 180 python3 scripts/eviction_tpot.py --budgets 256 512 1024 2048 \
    --refresh-budgets 1024 --refresh-select uniform score --json "$EV/h200-eviction-tpot.json" \
    | tail -30
  echo "tpot rc=$?"
  for q in none int4-g128; do for kv in auto int8; do
    a=(--window 4096 --prompt-len 4100 --decode-len 128 --warmup-tokens 16 --kv-dtype $kv)
    [ $q != none ] && a+=(--quant $q)
    timeout 55 "${BENCH[@]}" "${a[@]}" --json "$OUT/h200-kv-4096-$q-$kv.json" | tail -2
  done; done
elif [ "$STEP" = two ] || [ "$STEP" = three ]; then
  cat /tmp/fd/gguf.00 /tmp/fd/gguf.01 > /tmp/fd/smollm2.gguf 2>/dev/null \
    && echo "gguf sha256 $(sha256sum /tmp/fd/smollm2.gguf | cut -d' ' -f1) want $(cat .carry/gguf.sha256)"
  LIMIT=${LIMIT:-400}
  if [ "$STEP" = two ]; then DT=(--dtypes float32 bfloat16); else DT=(--dtypes float32 bfloat16 --token-check 2048); fi
  FASTDECODE_TUNE=0 timeout $((LIMIT + 80)) python3 scripts/eviction_study.py --model /tmp/fd/smollm2.gguf \
    --device cuda --no-progress "${DT[@]}" --recompute-dtypes bfloat16 --budgets 256 512 1024 2048 \
    --time-limit $LIMIT --out "$EV" --plot "$OUT/eviction-ppl.png" | grep -v "^|" | tail -150
  echo "study rc=$?"
  python3 scripts/eviction_study.py --report-only --out "$EV" --plot "$OUT/eviction-ppl.png" | tail -40
fi
(cd "$EV" && ls | head -200 | wc -l && tar czf /tmp/ev.tgz . ) && cp /tmp/ev.tgz "$OUT/h200-eviction-$STEP.tgz"
date

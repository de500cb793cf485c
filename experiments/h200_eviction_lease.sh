#!/usr/bin/env bash
# One lease, three back-to-back calls (the machine is released 30 s after a call; the GGUF
# halves live in /tmp/fd only while it stays warm). Run from the repository root:
#   call 1 (carry .carry/gguf.00 .carry/whlmin: the gguf wheel): bash experiments/h200_eviction_lease.sh one
#     the fused H2O/TOVA and prefill tests on CUDA, the prefill q-layout A/B with a profile
#     of each layout (scripts/gpu_prefill.py --parts ab,profile)
#   call 2 (carry .carry/gguf.01): ... two     the eviction study, resumed from perf/results
#   call 3 (no carry):             ... three   TPOT of every policy and budget of the study
#     (scripts/eviction_tpot.py: refresh rows through torch.compile, recompute as a prefill)
# Records accumulate in /tmp/fd/ev; each call returns all of them in one tar under $OUT.
# (At 6e84916 call 1 ran the parallel-evaluator diagnosis and the int8-KV benches at
# 4+4096: experiments/results/h200-eviction-lease-6e84916.txt.)
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
if [ "$STEP" = one ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fused_scored.py \
    tests/test_prefill.py -rs --junitxml="$OUT/pytest-cuda.xml" | tail -15
  echo "tests rc=${PIPESTATUS[0]}"
  timeout 200 python3 scripts/gpu_prefill.py --parts ab,profile --lengths 4096,16384 --reps 3 \
    --json "$EV/h200-prefill-ab.json" | tail -20
  echo "prefill ab rc=${PIPESTATUS[0]}"
elif [ "$STEP" = two ]; then
  cat /tmp/fd/gguf.00 /tmp/fd/gguf.01 > /tmp/fd/smollm2.gguf 2>/dev/null \
    && echo "gguf sha256 $(sha256sum /tmp/fd/smollm2.gguf | cut -d' ' -f1) want $(cat .carry/gguf.sha256)"
  LIMIT=${LIMIT:-400}
  DT=(--dtypes float32 bfloat16)
  FASTDECODE_TUNE=0 timeout $((LIMIT + 80)) python3 scripts/eviction_study.py --model /tmp/fd/smollm2.gguf \
    --device cuda --no-progress "${DT[@]}" --recompute-dtypes bfloat16 --budgets 256 512 1024 2048 \
    --time-limit $LIMIT --out "$EV" --plot "$OUT/eviction-ppl.png" | grep -v "^|" | tail -150
  echo "study rc=$?"
  python3 scripts/eviction_study.py --report-only --out "$EV" --plot "$OUT/eviction-ppl.png" | tail -40
elif [ "$STEP" = three ]; then
  timeout ${TPOT_TIMEOUT:-520} python3 scripts/eviction_tpot.py --budgets 256 512 1024 2048 \
    --refresh-budgets 256 512 1024 2048 --refresh-select uniform score \
    --json "$EV/h200-eviction-tpot.json" | tail -45
  echo "tpot rc=${PIPESTATUS[0]}"
fi
(cd "$EV" && ls | head -200 | wc -l && tar czf /tmp/ev.tgz . ) && cp /tmp/ev.tgz "$OUT/h200-eviction-$STEP.tgz"
date

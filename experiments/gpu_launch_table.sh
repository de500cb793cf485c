#!/usr/bin/env bash
# One device call: fill this card's GEMV launch table and bench every recipe with it.
#
#   bash experiments/gpu_launch_table.sh sweep bench   # both in one call
#   bash experiments/gpu_launch_table.sh bench         # the bundled table (TABLE=file: another)
#
# sweep (~45 s on the H200): the candidates compiled by 6 processes at once (Triton's
# cache), then timed graphed by one (scripts/gpu_gemv_sweep.py) -> $OUT/$CLASS-gemv-sweep.json
# and $OUT/launch-$CLASS.json. bench: `fastdecode bench` of bf16, int8, int4-g128 and
# int4-mlp-g128 at 4+2048, int8 KV and bf16 KV at 4+4096, and int8 again (RUNS picks), each
# a fresh process with the table ($TABLE; default the sweep's of the same call, else the
# bundled one) and the copy bandwidth measured in it; the records merged into
# $OUT/$CLASS-benches.json after each run (a call returns 8 files at most).
set -uo pipefail
PHASES=("$@"); [ ${#PHASES[@]} -eq 0 ] && PHASES=(sweep bench)
OUT=${OUT:-/tmp/fd-out}
CLASS=${CLASS:-h200}
mkdir -p "$OUT" /tmp/fd/rec
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/fd/triton PYTHONPATH=$PWD/src:$PWD/scripts
[ -f .carry/commit ] && export FASTDECODE_GIT_COMMIT=$(cat .carry/commit)
exec > >(tee -a "$OUT/log-launch-table.txt") 2>&1
date; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
TABLE=${TABLE:-}  # empty: the sweep's of this call if it ran, else the bundled table
merge() {
  python3 - "$OUT/$CLASS-benches.json" /tmp/fd/rec/*.json <<'EOF'
import json, sys
out = {}
for p in sys.argv[2:]:
    r = json.load(open(p))
    out[p.rsplit("/", 1)[-1].removesuffix(".json")] = r
    m = r.get("result") or {}
    bw = m.get("copy_gbps") or 0
    ms = (m.get("tpot_ms") or {}).get("median") or 0
    print(f"{p.rsplit('/', 1)[-1]:24s} tpot {ms:.3f} ms floor {m.get('floor_ms') or 0:.3f} "
          f"copy {bw:.0f} launches "
          f"{len(r.get('launches') or {})} from {sorted({v['from'] for v in (r.get('launches') or {}).values()})}")
json.dump(out, open(sys.argv[1], "w"), indent=1)
EOF
}
for PHASE in "${PHASES[@]}"; do
if [ "$PHASE" = sweep ]; then
  start=$SECONDS; pids=()
  # compile in 6 processes (shape groups), then time in one, so timings never overlap
  for g in "bf16 qkv+norm,int8 qkv" "bf16 up+norm,int8 up" "bf16 out|down,int8 out" \
           "bf16 head+norm,int4 qkv,int4 up" "bf16 qkv,int4 out,int4 down" \
           "bf16 out,int8 down,int4 out|down"; do
    timeout ${COMPILE_TIMEOUT:-200} python3 scripts/gpu_gemv_sweep.py --compile-only --shapes "$g" > /tmp/fd/compile-$RANDOM.txt 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"  # not a bare wait: that waits for the tee too
  echo "compiled in $((SECONDS - start)) s"; tail -qn 1 /tmp/fd/compile-*.txt
  timeout ${SWEEP_TIMEOUT:-300} python3 scripts/gpu_gemv_sweep.py --json "$OUT/$CLASS-gemv-sweep.json" \
    --table "$OUT/launch-$CLASS.json" --cls "$CLASS" --reps 15 --rounds 2 | grep -v " err "
  echo "sweep rc=$? in $((SECONDS - start)) s"
elif [ "$PHASE" = bench ]; then
  [ -z "$TABLE" ] && [ -f "$OUT/launch-$CLASS.json" ] && TABLE=$OUT/launch-$CLASS.json
  [ -n "$TABLE" ] && export FASTDECODE_LAUNCH_TABLE=$TABLE
  echo "launch table: ${TABLE:-bundled}"
  B=(python3 -m fastdecode.cli bench --model pythia-2.8b --random-weights --dtype bfloat16
     --device cuda --sink 4 --compile graphs --decode-len 128 --warmup-tokens 16)
  RUNS=${RUNS:-"bf16:2048 int8:2048 int4-g128:2048 int4-mlp-g128:2048 kv8:4096 bf16:4096 int8:2048:b"}
  for run in $RUNS; do
    IFS=: read -r r w tag <<< "$run"
    extra=(); [ "$r" = kv8 ] && extra=(--kv-dtype int8) || { [ "$r" != bf16 ] && extra=(--quant "$r"); }
    name="$r-$w${tag:+-$tag}"
    timeout ${BENCH_TIMEOUT:-80} "${B[@]}" --window "$w" --prompt-len $((w + 4)) "${extra[@]}" --check 4 \
      --json "/tmp/fd/rec/$name.json" 2>&1 | grep -E "^ours|TPOT|copy|error|Error" | head -6
    echo "bench $name rc=$?"
    merge  # after each: what finished comes back even if the call is cut
  done
fi
done
ls -la "$OUT"; date

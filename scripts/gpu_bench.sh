#!/usr/bin/env bash
# GPU runs of the fused decode path, one device call per phase (docs/gpu.md has the method).
#
# Phases run in the order given, e.g. `bash scripts/gpu_bench.sh check quant`:
#
#   bash scripts/gpu_bench.sh check    # every fused test on CUDA (launch configurations fixed)
#   bash scripts/gpu_bench.sh main     # Pythia shapes, 4+2048: the main bench (fused graphs)
#                                      # with the eager check, a profile, the HF peers, the
#                                      # window sweep; the figures #4 asks for
#   bash scripts/gpu_bench.sh quant    # int8 / int4-mlp-g128 / int4-g128 and int8 KV benches
#   bash scripts/gpu_bench.sh prefill  # scripts/gpu_prefill.py: flash prefill vs HF SDPA, the
#                                      # compute floor, the parallel PPL evaluator old vs new
#   bash scripts/gpu_bench.sh total    # the users' shape (prompt 16,384, 1,024 new tokens,
#                                      # 4+2048): TTFT and total time beside HF static + compile
#   bash scripts/gpu_bench.sh stage    # nothing but leave .carry/gguf.00 in /tmp/fd
#   bash scripts/gpu_bench.sh pythia   # gpu-marked fused tests; Pythia-2.8B shapes, 4+2048:
#                                      # main bench (fused graphs) with the eager check, a
#                                      # profile, HF peers, variants (fused without graph,
#                                      # eager; VARIANTS=default,none,graphs:inductor adds the
#                                      # torch.compile graph, ~2 min), window and prompt sweeps
#   bash scripts/gpu_bench.sh sweep    # scripts/gpu_gemv_sweep.py: every GEMV launch
#                                      # configuration of the step's shapes, graphed, and the
#                                      # card's launch table (experiments/gpu_launch_table.sh:
#                                      # the same, compiled in parallel, then the benches)
#   bash scripts/gpu_bench.sh ab       # experiments/gpu_fused_ab.py: a code path off/on
#                                      # (AB_OPTION=pdl|norm_in_gemv|branches|priority) for bf16,
#                                      # int8 and int4 on Pythia shapes (AB_RECIPES picks)
#   bash scripts/gpu_bench.sh kd       # SmolLM2: `fastdecode ppl` of the base model, then per
#                                      # recipe in KD_RECIPES (default int4-mlp-g128-kd)
#                                      # `fastdecode quantize` on CUDA (bf16) and its `ppl`
#                                      # (PG19 10146, 8,192 tokens, 4+1020): #5's perplexity
#                                      # target; needs both GGUF halves (stage first)
#   bash scripts/gpu_bench.sh baseline # BASELINE_RUNS (3) speed-only runs of the perf suite
#                                      # (no PPL; BASELINE_K, default the graphed steps), then
#                                      # compare --record-baseline and --suggest-budgets: the
#                                      # class's absolute budgets from the mean of the runs
#   bash scripts/gpu_bench.sh agree    # the perf suite (speed only) and `fastdecode bench` on
#                                      # bf16, int8, int4-mlp g128, int4 g128, int8 KV in one
#                                      # lease, then compare --bench: within 3%? (#22 item 2)
#   bash scripts/gpu_bench.sh study    # `fastdecode study` (docs/study.md): Pythia-2.8B shapes,
#                                      # prompt 4096 + 128 new tokens, rows: the team's
#                                      # StreamingLLM (baseline, mean of 2), torchao int8 and
#                                      # int4-mlp-g128 (torchao wheel in .carry/whl), ours bf16 /
#                                      # int8 / int4; PPL on SmolLM2 (both GGUF halves: stage
#                                      # first). Resumable: run it again to finish the rows left
#   bash scripts/gpu_bench.sh h2o      # issue 20: the fused H2O/TOVA tests on CUDA; Pythia
#                                      # shapes, fused graphs, one process: streaming 4+2048
#                                      # vs H2O 4+1024+1024 in bf16, int8, int4-mlp-g128
#                                      # (target H2O <= 1.05x); the h2o-team bench preset
#   bash scripts/gpu_bench.sh eviction # issues 20/23: the eviction Pareto study on SmolLM2 (both
#                                      # GGUF halves: stage first; else random weights into
#                                      # /tmp/fd, a check), PG19 10146 + 10321, 8,192 tokens,
#                                      # fp32 + bf16, budgets 256..2048 (scripts/eviction_study.py,
#                                      # resumable: records already in perf/results are
#                                      # skipped), then TPOT per policy and budget on Pythia
#                                      # shapes (scripts/eviction_tpot.py); ONE tar of the
#                                      # records under $OUT. EVICTION_ARGS / EVICTION_TPOT_ARGS
#                                      # add to (override) each script's options
#   bash scripts/gpu_bench.sh suite    # SmolLM2 (real weights) graphed vs eager in float32 and
#                                      # bf16, then `nox -s gpu` (gpu tests + the perf suite
#                                      # with PPL, history saved) and `nox -s compare`;
#                                      # `real` and `perf` are its two halves, one call each
#                                      # (both together may not fit one call's 600 s)
#
# Carried (ignored) files: .carry/gguf.00 (pythia call) and .carry/gguf.01 (suite call) are
# the halves of the bundled SmolLM2 GGUF, joined in /tmp/fd, which survives between calls
# only while the machine stays warm; .carry/whl holds the gguf and nox wheels.
# Writes records and logs under $OUT (default /tmp/fd-out) and prints a short table last.
set -uo pipefail
PHASES=("${@:-pythia}")
KD_RECIPES=${KD_RECIPES:-int4-mlp-g128-kd}
OUT=${OUT:-/tmp/fd-out}
CLASS=${CLASS:-h200}  # prefix of the records' names: the GPU class the run is made on
mkdir -p "$OUT" /tmp/fd
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/fd/inductor TRITON_CACHE_DIR=/tmp/fd/triton
export PYTHONPATH=$PWD/src FASTDECODE_CACHE=/tmp/fd/cache
# the tree's commit (the copy's .git may be stale): written by the caller to .carry/commit
[ -f .carry/commit ] && export FASTDECODE_GIT_COMMIT=$(cat .carry/commit)
LOG=$OUT/log-$(IFS=-; echo "${PHASES[*]}").txt
exec > >(tee -a "$LOG") 2>&1
date
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv,noheader || true
for part in 00 01; do [ -f .carry/gguf.$part ] && cp .carry/gguf.$part /tmp/fd/; done
if [ -d .carry/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH
fi
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers",
  transformers.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
BENCH=(python3 -m fastdecode.cli bench --model pythia-2.8b --random-weights --dtype bfloat16
       --device cuda --sink 4 --window 2048 --compile graphs)

join_gguf() {  # the two halves (two calls' carries) -> /tmp/fd/smollm2.gguf
  if [ -f /tmp/fd/gguf.00 ] && [ -f /tmp/fd/gguf.01 ]; then
    cat /tmp/fd/gguf.00 /tmp/fd/gguf.01 > /tmp/fd/smollm2.gguf
    echo "gguf sha256 $(sha256sum /tmp/fd/smollm2.gguf | cut -d' ' -f1) want $(cat .carry/gguf.sha256)"
  elif [ ! -f /tmp/fd/smollm2.gguf ]; then
    echo "no gguf half in /tmp/fd (the machine was not warm?)"; return 1
  fi
}

for PHASE in "${PHASES[@]}"; do
echo "== phase $PHASE"
if [ "$PHASE" = stage ]; then
  ls -la /tmp/fd
elif [ "$PHASE" = check ]; then
  # every fused test on CUDA: the GEMV property over every code path, whole steps graphed
  # (FASTDECODE_TUNE=0: the heuristic launches, not the table's)
  FASTDECODE_TUNE=0 timeout 240 python3 -m pytest -q tests/test_fused.py tests/test_prefill.py tests/test_layering.py -p no:cacheprovider
  echo "pytest fused (all, cuda) rc=$?"
elif [ "$PHASE" = pythia ]; then
  timeout 150 python3 -m pytest -q -m gpu tests/test_fused.py -p no:cacheprovider
  echo "pytest fused gpu rc=$?"
  timeout 560 "${BENCH[@]}" --prompt-len 4096 --decode-len 256 --warmup-tokens 32 --check 16 \
    --profile "$OUT/trace-fused.json.gz" --profile-steps 5 \
    --sweep-prompts 128,8192 --sweep-decode-len 96 --sweep-warmup-tokens 16 \
    --peers hf-eager,hf-static-compile --peer-decode-len 64 --peer-warmup-tokens 8 \
    --variants ${VARIANTS:-default,none} --sweep-windows 512,1024,4096 \
    --target-tpot-ms 2.4 --target-vs-static 2 --target-vs-eager 30 \
    --json "$OUT/$CLASS-pythia-fused.json"
  echo "bench rc=$?"
elif [ "$PHASE" = sweep ]; then
  timeout 420 python3 scripts/gpu_gemv_sweep.py ${SWEEP_SHAPES:+--shapes "$SWEEP_SHAPES"} \
    ${SWEEP_PARTS:+--parts "$SWEEP_PARTS"} \
    --json "$OUT/$CLASS-gemv-sweep.json" --table "$OUT/launch-$CLASS.json"
  echo "sweep rc=$?"
elif [ "$PHASE" = ab ]; then
  # AB_OPTION=pdl|norm_in_gemv|branches|priority (default pdl), AB_VALUES (default 0,1), AB_RECIPES
  timeout 420 python3 experiments/gpu_fused_ab.py --option "${AB_OPTION:-pdl}" \
    --values "${AB_VALUES:-0,1}" \
    --recipes "${AB_RECIPES:-bf16,int8,int4-g128,int4-mlp-g128}" \
    --json "$OUT/$CLASS-fused-ab-${AB_OPTION:-pdl}.json"
  echo "ab rc=$?"
elif [ "$PHASE" = main ]; then
  timeout 240 "${BENCH[@]}" --prompt-len 4096 --decode-len 256 --warmup-tokens 32 --check 16 \
    --profile "$OUT/trace-final.json.gz" --profile-steps 5 \
    --peers hf-eager,hf-static-compile --peer-decode-len 64 --peer-warmup-tokens 8 \
    --variants default --sweep-windows 512,1024,4096 \
    --target-tpot-ms 2.4 --target-vs-static 2 --target-vs-eager 30 \
    --json "$OUT/$CLASS-pythia-final.json"
  echo "bench rc=$?"
elif [ "$PHASE" = prefill ]; then
  timeout 300 python3 scripts/gpu_prefill.py --json "$OUT/$CLASS-prefill.json"
  echo "prefill rc=$?"
elif [ "$PHASE" = study ]; then
  join_gguf && PPL_ARGS=(--ppl-model /tmp/fd/smollm2.gguf --ppl-tokens 1536) \
    || PPL_ARGS=(--ppl-tokens 0)
  timeout ${STUDY_TIMEOUT:-560} python3 -m fastdecode.cli study --model pythia-2.8b --random-weights \
    --device cuda --prompt-len 4096 --new-tokens 128 --warmup-tokens 16 "${PPL_ARGS[@]}" \
    --configs peer:team-streaming,bf16-stream-graphs,int8-all-graphs,peer:hf-torchao-int8,peer:hf-torchao-int4-mlp-g128,int4-mlp-g128-graphs,peer:team-streaming-lazy \
    --baseline peer:team-streaming --baseline-runs 2 \
    --baseline-store /tmp/fd/study-baselines --out /tmp/fd/$CLASS-study  # kept while warm
  echo "study rc=$?"
  cp -r /tmp/fd/$CLASS-study "$OUT/"
elif [ "$PHASE" = total ]; then
  timeout 400 "${BENCH[@]}" --prompt-len 16384 --decode-len 1024 --warmup-tokens 32 \
    --peers hf-static-compile --peer-total --peer-decode-len 64 --peer-warmup-tokens 8 \
    --target-total-vs-static 0.5 --json "$OUT/$CLASS-pythia-total.json"
  echo "bench total rc=$?"
elif [ "$PHASE" = quant ]; then
  for q in int8:1.6 int4-mlp-g128:1.9 int4-g128:1.35; do
    r=${q%%:*}; t=${q##*:}
    timeout 90 "${BENCH[@]}" --quant "$r" --prompt-len 2052 --decode-len 128 --warmup-tokens 16 --check 8 \
      --profile "/tmp/fd/trace-$r.json.gz" --profile-steps 5 \
      --target-tpot-ms "$t" --json "$OUT/$CLASS-pythia-$r.json" | tail -4
    echo "bench $r rc=$?"
  done
  timeout 60 "${BENCH[@]}" --kv-dtype int8 --prompt-len 2052 --decode-len 128 --warmup-tokens 16 --json "$OUT/$CLASS-pythia-int8kv.json" | tail -3
  echo "bench int8kv rc=$?"
elif [ "$PHASE" = h2o ]; then
  FASTDECODE_TUNE=0 timeout 180 python3 -m pytest -q tests/test_fused_scored.py -p no:cacheprovider
  echo "pytest fused scored (cuda) rc=$?"
  timeout 240 python3 scripts/gpu_h2o_bench.py --recipes bf16,int8,int4-mlp-g128 --rounds 3 \
    --json "$OUT/$CLASS-h2o-vs-streaming.json"
  echo "h2o vs streaming rc=$?"
  timeout 150 python3 -m fastdecode.cli bench --preset h2o-team --model pythia-2.8b \
    --random-weights --dtype bfloat16 --device cuda --json "$OUT/$CLASS-h2o-team.json"
  echo "bench h2o-team rc=$?"
elif [ "$PHASE" = eviction ]; then
  if join_gguf; then EV=${EVICTION_OUT:-perf/results}; M=(--model /tmp/fd/smollm2.gguf)
  else EV=${EVICTION_OUT:-/tmp/fd/eviction-random}; M=(--random-weights); fi
  mkdir -p "$EV"
  # recompute (B + 1 tokens re-encoded per token) in bf16 only; fp32 would not fit (docs/eviction.md)
  FASTDECODE_TUNE=0 timeout ${EVICTION_TIMEOUT:-330} python3 scripts/eviction_study.py "${M[@]}" \
    --device cuda --no-progress --dtypes float32 bfloat16 --recompute-dtypes bfloat16 \
    --time-limit ${EVICTION_TIME_LIMIT:-290} --out "$EV" --plot "$OUT/eviction-ppl.png" ${EVICTION_ARGS:-}
  echo "eviction study rc=$?"
  timeout ${EVICTION_TPOT_TIMEOUT:-240} python3 scripts/eviction_tpot.py \
    --json "$EV/$CLASS-eviction-tpot.json" ${EVICTION_TPOT_ARGS:-}
  echo "eviction tpot rc=$?"
  python3 scripts/eviction_study.py --report-only --out "$EV" --plot "$OUT/eviction-ppl.png" | tail -40
  (cd "$EV" && tar czf "$OUT/$CLASS-eviction.tar.gz" ./*-eviction-*.json)  # only the study's
  echo "bundle: $OUT/$CLASS-eviction.tar.gz ($(tar tzf "$OUT/$CLASS-eviction.tar.gz" | wc -l) records)"
elif [ "$PHASE" = kd ]; then
  # KD_RECIPES: comma-separated (default int4-mlp-g128-kd)
  join_gguf || exit 3
  PPL=(python3 -m fastdecode.cli ppl --data pg19-10146 --max-tokens 8192 --mode streaming
       --sink 4 --window 1020 --dtype bfloat16 --device cuda)
  # per-token NLL files stay on the machine: a call returns a limited number of files
  timeout 60 "${PPL[@]}" --model /tmp/fd/smollm2.gguf --json "$OUT/$CLASS-ppl-bf16.json" \
    --per-token /tmp/fd/bf16.nll.csv
  for r in ${KD_RECIPES//,/ }; do
    start=$SECONDS
    timeout 400 python3 -m fastdecode.cli quantize --model /tmp/fd/smollm2.gguf --device cuda \
      --dtype bfloat16 --recipe "$r" --out "/tmp/fd/q-$r"
    echo "quantize $r rc=$? wall $((SECONDS - start)) s"
    timeout 60 "${PPL[@]}" --model "/tmp/fd/q-$r" --json "$OUT/$CLASS-ppl-$r.json" \
      --per-token "/tmp/fd/$r.nll.csv"
    echo "ppl $r rc=$?"
  done
elif [ "$PHASE" = suite ] || [ "$PHASE" = real ] || [ "$PHASE" = perf ]; then
  # suite = real + perf; with GPTQ in the int4 configurations the two together can pass
  # one device call's 600 s (71baa94: nox -s gpu cut at 380 s), so run them as two calls
  join_gguf || exit 3
  if [ "$PHASE" != perf ]; then
    timeout 240 python3 scripts/gpu_real_check.py --model /tmp/fd/smollm2.gguf --tokens 300 \
      --dtypes float32,bfloat16 --json "$OUT/$CLASS-real-check.json"
    echo "real check rc=$?"
  fi
  if [ "$PHASE" != real ]; then
    export FASTDECODE_PERF_PPL_MODEL=/tmp/fd/smollm2.gguf
    timeout $([ "$PHASE" = perf ] && echo 540 || echo 380) nox -s gpu
    echo "nox gpu rc=$?"
    timeout 30 nox -s compare
    echo "nox compare rc=$?"
    mkdir -p "$OUT/history" && cp perf/history/h100/*/*.json "$OUT/history/" 2>/dev/null
  fi
elif [ "$PHASE" = baseline ]; then
  for i in $(seq "${BASELINE_RUNS:-3}"); do
    FASTDECODE_PERF_PPL_TOKENS=0 timeout "${BASELINE_TIMEOUT:-170}" python3 -m pytest tests/perf \
      -m gpu -q -p no:cacheprovider -k "${BASELINE_K:-not eager and not compiled}" --durations=0 \
      --benchmark-storage="file://perf/history/$CLASS" --benchmark-autosave \
      --benchmark-columns=median,mean,iqr,rounds
    echo "perf suite run $i rc=$?"
  done
  python3 -m fastdecode.bench.compare --storage "perf/history/$CLASS" \
    --record-baseline "${BASELINE_RUNS:-3}" && python3 -m fastdecode.bench.compare \
    --storage "perf/history/$CLASS" --suggest-budgets | tee "$OUT/$CLASS-budgets.toml"
  mkdir -p "$OUT/history" && cp -r perf/history/"$CLASS" "$OUT/history/" \
    && cp perf/baselines/"$CLASS".json "$OUT/history/baseline-$CLASS.json"
elif [ "$PHASE" = agree ]; then
  FASTDECODE_PERF_PPL_TOKENS=0 timeout 300 python3 -m pytest tests/perf -m gpu -q \
    -p no:cacheprovider -k "bf16-stream-graphs or int8-all or int4-mlp-g128 or int4-all-g128 or int8kv" \
    --benchmark-storage="file://perf/history/$CLASS" --benchmark-autosave
  echo "perf suite rc=$?"
  recs=()
  for q in bf16 int8 int4-mlp-g128-rtn int4-g128-rtn kv8; do
    case $q in bf16) a=();; kv8) a=(--kv-dtype int8);; *) a=(--quant "$q");; esac
    timeout 90 "${BENCH[@]}" "${a[@]}" --json "$OUT/$CLASS-agree-$q.json" | tail -2
    recs+=("$OUT/$CLASS-agree-$q.json")
  done
  python3 -m fastdecode.bench.compare --storage "perf/history/$CLASS" \
    --bench "$(IFS=,; echo "${recs[*]}")"
  echo "agree rc=$?"
  mkdir -p "$OUT/history" && cp -r perf/history/"$CLASS" "$OUT/history/"
else
  echo "unknown phase $PHASE" && exit 2
fi
done
ls -la "$OUT"
date

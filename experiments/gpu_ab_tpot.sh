#!/usr/bin/env bash
# A/B: TPOT of an old tree (.wt-old/src) vs the current tree, interleaved, same lease.
set -u
mkdir -p /tmp/ab
B=(python3 -m fastdecode.cli bench --model pythia-2.8b --random-weights --dtype bfloat16
   --device cuda --sink 4 --window 2048 --compile graphs --prompt-len 2052 --decode-len 128
   --warmup-tokens 16)
for round in 1 2; do
  for q in none int8 int4-mlp-g128; do
    for v in old new; do
      src=$PWD/src; [ $v = old ] && src=$PWD/.wt-old/src
      qa=(); [ $q != none ] && qa=(--quant $q)
      line=$(PYTHONPATH=$src timeout 80 "${B[@]}" "${qa[@]}" --json /tmp/ab/ab-$v-$q-$round.json 2>&1 | grep "ours graphs")
      echo "AB round=$round recipe=$q code=$v :: $line"
    done
  done
done
tar -czf $OUT/ab.tgz -C /tmp ab

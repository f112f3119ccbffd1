#!/usr/bin/env bash
# evax beside PyTorch on this machine, in alternating rounds: one `evax bench` run, then one
# `torch_bench.py` run, ROUNDS times; prints seconds per batch of each, the ratio per round and
# the ratio of the means. This machine's speed drifts by tens of percent within minutes, so a
# single pair of runs says little; report every round.
#
# usage: scripts/speed-rounds.sh ROUNDS MODE [MODEL]
#   MODE: f32 (forward, batch 16), bf16 (forward, batch 16; PyTorch under autocast) or
#         train (training step, batch 8)
#   MODEL: s (default), ti, b, vit-s, r50 or dn121
# env: EVAX (default ./target/release/evax), PYTHON (with torch, torchvision and timm; default
#      python3), EVAX_SHARED (default ../shared)
set -euo pipefail
rounds=${1:?rounds}
mode=${2:?mode: f32, bf16 or train}
model=${3:-s}
evax=${EVAX:-./target/release/evax}
python=${PYTHON:-python3}
bench="${EVAX_SHARED:-../shared}/bench/torch_bench.py"
case "$model" in
  vit-s) torch_model=vits ;;
  *) torch_model=$model ;;
esac
case "$mode" in
  f32) ours=(--batch 16 --iters 5); theirs=(infer "$torch_model" 16 224 5) ;;
  bf16) ours=(--batch 16 --iters 5 --precision bf16); theirs=(infer "$torch_model" 16 224 5 bf16) ;;
  train) ours=(--batch 8 --iters 4 --train); theirs=(train "$torch_model" 8 4) ;;
  *) echo "mode must be f32, bf16 or train" >&2; exit 2 ;;
esac
lscpu 2>/dev/null | grep -m1 "Model name" || true
printf 'round  evax_s  torch_s  ratio\n'
sum_e=0
sum_t=0
for r in $(seq "$rounds"); do
  e=$("$evax" bench --model "$model" "${ours[@]}" --json | python3 -c \
    'import json, sys; d = json.load(sys.stdin); print(d["step_s"] or d["batch_s"])')
  t=$("$python" "$bench" "${theirs[@]}" | tail -n 1)
  printf '%5d  %6.3f  %7.3f  %5.2f\n' "$r" "$e" "$t" "$(python3 -c "print($t / $e)")"
  sum_e=$(python3 -c "print($sum_e + $e)")
  sum_t=$(python3 -c "print($sum_t + $t)")
done
python3 -c "print(f'means: evax {$sum_e / $rounds:.3f} s, PyTorch {$sum_t / $rounds:.3f} s, ' \
  f'PyTorch / evax {$sum_t / $sum_e:.2f}')"

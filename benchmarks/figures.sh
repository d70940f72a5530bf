#!/usr/bin/env bash
# Every training figure in the README, one run each, on the CPU. About 21 minutes on 2 cores (20 min 34 s measured).
#   bash benchmarks/figures.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/figures}
run() { python train.py --device cpu --out "$out/$1" --overwrite "${@:2}" | grep -E "^(test|true density)"; }
echo "== digits, 6000 steps of 128 (the default run's budget)"
for model in realnvp glow nice; do echo "-- $model"; run "$model-digits" --model "$model" --preset digits; done
echo "== 2D densities of known entropy, 3000 steps of 256"
for data in checkerboard eight_gaussians; do
  for model in realnvp nsf; do
    echo "-- $model on $data"; run "$model-$data" --model "$model" --preset toy2d --dataset "$data" --steps 3000
  done
done
echo "== 10-D Gaussian mixture of known entropy, 3000 steps of 256"
for model in maf nsf; do
  echo "-- $model"; run "$model-mixture10d" --model "$model" --preset small --dataset mixture10d --steps 3000 --batch-size 256
done
echo "== class-conditional (--conditional: the one-hot label is the context)"
echo "-- realnvp on digits, 6000 steps of 128"; run realnvp-digits-conditional --conditional
for data in rings two_moons; do
  for model in realnvp nsf; do
    echo "-- $model on $data given the class, 3000 steps of 256"
    run "$model-$data-conditional" --model "$model" --preset toy2d --dataset "$data" --steps 3000 --conditional
  done
done

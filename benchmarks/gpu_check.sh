#!/usr/bin/env bash
# GPU check at the scale users train (benchmarks/gpu_check.py says what it runs): Glow's
# CIFAR-10 training step at 3x32x32 in fp32, bf16 and under torch.compile (images/s, peak
# GPU memory), and train.py's default digits run on the GPU against README's CPU figure.
# Under 10 minutes on one GPU; synthetic images and the embedded digits, so no network.
#
# Usage, from anywhere (it runs from the repository root):
#     bash benchmarks/gpu_check.sh            # needs a CUDA GPU
#     bash benchmarks/gpu_check.sh --cpu      # tiny sizes on the CPU, about a minute (the tests run it)
#     bash benchmarks/gpu_check.sh --parts glow-fp32,digits --out /tmp/check
#
# Prints one table (part, ok/FAIL, images/s, peak GiB, note); exits 1 if a part failed.
# Environment: PYTHON (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"

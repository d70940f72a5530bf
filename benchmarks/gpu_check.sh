#!/usr/bin/env bash
# GPU check of train.py: the same short run on the GPU in fp32, in bf16 and with --compile,
# and on the CPU; prints images/second and test bits/dim of each, read from metrics.jsonl.
#
# Usage, from anywhere (it runs from the repository root; the data are the embedded digits,
# so no network is needed):
#     bash benchmarks/gpu_check.sh                  # all four runs (needs a CUDA GPU)
#     STEPS=20 ONLY=cpu bash benchmarks/gpu_check.sh  # the CPU run only, briefly
#
# Environment: STEPS (default 300), MODEL (realnvp), PRESET (digits), BATCH (256),
# LOG_EVERY (50; images/s is the mean over log intervals after the first, which holds
# the warm-up and compilation), OUT (runs/gpu_check), ONLY (all, gpu or cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-300}
MODEL=${MODEL:-realnvp}
PRESET=${PRESET:-digits}
BATCH=${BATCH:-256}
LOG_EVERY=${LOG_EVERY:-50}
OUT=${OUT:-runs/gpu_check}
ONLY=${ONLY:-all}
if (( LOG_EVERY > STEPS )); then LOG_EVERY=$STEPS; fi

case "$ONLY" in
  all) RUNS="gpu-fp32 gpu-bf16 gpu-compile cpu" ;;
  gpu) RUNS="gpu-fp32 gpu-bf16 gpu-compile" ;;
  cpu) RUNS="cpu" ;;
  *) echo "gpu_check.sh: ONLY expected all, gpu or cpu, got '$ONLY'" >&2; exit 2 ;;
esac
if [[ "$ONLY" != cpu ]] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: expected a CUDA GPU for the gpu runs, got none; run ONLY=cpu for the CPU part" >&2
  exit 2
fi

flags_of() {  # the train.py flags of one named run
  case "$1" in
    gpu-fp32) echo "--device cuda --amp none" ;;
    gpu-bf16) echo "--device cuda --amp bf16" ;;
    gpu-compile) echo "--device cuda --amp none --compile" ;;
    cpu) echo "--device cpu --amp none" ;;
  esac
}

mkdir -p "$OUT"
for name in $RUNS; do
  echo "== $name: train.py $(flags_of "$name"), log in $OUT/$name.log" >&2
  # shellcheck disable=SC2046  # the flags are meant to split into words
  if ! python train.py --model "$MODEL" --preset "$PRESET" --steps "$STEPS" --batch-size "$BATCH" \
      --log-every "$LOG_EVERY" --ckpt-every 0 --eval-every 0 --num-samples 16 \
      --out "$OUT/$name" --overwrite $(flags_of "$name") > "$OUT/$name.log" 2>&1; then
    echo "gpu_check.sh: the $name run failed; the end of its log:" >&2
    tail -n 20 "$OUT/$name.log" >&2
    exit 1
  fi
done

echo
echo "$MODEL/$PRESET, $STEPS steps of $BATCH, $(python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")')"
python - "$OUT" $RUNS <<'EOF'
import json, sys
from pathlib import Path

out, names = Path(sys.argv[1]), sys.argv[2:]
print(f"{'run':<12} {'images/s':>10} {'test bits/dim':>20}")
for name in names:
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in records if r["split"] == "train"]
    steady = train[1:] or train  # the first interval holds warm-up and compilation
    speed = sum(r["images_per_sec"] for r in steady) / len(steady)
    test = [r for r in records if r["split"] == "test"][-1]
    print(f"{name:<12} {speed:>10.0f} {test['bits_per_dim']:>12.4f} ± {test['bits_per_dim_stderr']:.4f}")
EOF

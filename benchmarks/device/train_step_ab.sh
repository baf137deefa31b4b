#!/usr/bin/env bash
# A/B of the training step on one GPU, old commit vs the working tree, in one device call, so
# machine-to-machine spread cannot pass for a regression (issue 19's re-check: 7.13x vs 8.98x).
#   here:   bash benchmarks/device/train_step_ab.sh prepare [OLD_COMMIT]   # writes .ab/old (git-ignored)
#   device: bash benchmarks/device/train_step_ab.sh run       # after the Ray wheels are staged; carry .ab
# Each side runs train_throughput.py twice, interleaved (old, new, old, new), on the same
# model files, and prints its varlen QLoRA tokens/s.
set -uo pipefail
case "${1:-run}" in
  prepare)
    old=${2:-cbf2214}
    grep -qx '/.ab/' .git/info/exclude 2>/dev/null || echo '/.ab/' >> .git/info/exclude
    rm -rf .ab && mkdir -p .ab/old && git archive "$old" ray_jobs benchmarks | tar -x -C .ab/old
    echo "$old" > .ab/old/COMMIT; du -sh .ab ;;
  run)
    export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/device.txt"
    variants=seeds,medtune-varlen-liger-auto
    for round in 1 2; do
      for side in old new; do
        root=$PWD; [ "$side" = old ] && root=$PWD/.ab/old
        (cd "$root" && PYTHONPATH=/tmp/gpu-site:$root python3 benchmarks/train_throughput.py --shape llama-8b \
          --workdir /tmp/ab-bench --variants "$variants" --out "$OUT/ab-$side-$round.json" 2>&1 \
          | grep -v "Loading weights\|Writing model" > "$OUT/ab-$side-$round.txt")
        echo "$side round $round: $(grep -o '"tokens_per_s": [0-9.]*' "$OUT/ab-$side-$round.json" | tr '\n' ' ')"
      done
    done ;;
esac

#!/usr/bin/env bash
# A/B of the training step on one GPU, older commits vs the working tree, in one device call,
# so machine-to-machine spread cannot pass for a regression (issue 19's re-check: 7.13x vs 8.98x).
#   here:   bash benchmarks/device/train_step_ab.sh prepare NAME [COMMIT]  # writes .ab/NAME (git-ignored)
#   device: [SIDES='old new'] bash benchmarks/device/train_step_ab.sh run [ROUNDS]  # after the Ray wheels are staged; carry .ab
# Every side (each .ab/NAME, then the working tree as "new") runs train_throughput.py once per
# round, interleaved, on the same model files, and prints its varlen QLoRA tokens/s (and the
# seeds' recipe's once).
set -uo pipefail
case "${1:-run}" in
  prepare)
    name=${2:?prepare NAME [COMMIT]}; commit=${3:-HEAD}
    grep -qx '/.ab/' .git/info/exclude 2>/dev/null || echo '/.ab/' >> .git/info/exclude
    rm -rf ".ab/$name" && mkdir -p ".ab/$name" && git archive "$commit" ray_jobs benchmarks | tar -x -C ".ab/$name"
    git rev-parse --short "$commit" > ".ab/$name/COMMIT"; du -sh .ab ;;
  run)
    export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/device.txt"
    sides=${SIDES:-"$(ls .ab 2>/dev/null | tr '\n' ' ')new"}
    for round in $(seq 1 "${2:-2}"); do
      for side in $sides; do
        root=$PWD; [ "$side" = new ] || root=$PWD/.ab/$side
        # The seeds' recipe once, for the ratio; it is the same code on every side.
        variants=medtune-varlen-liger-auto; [ "$side$round" = new1 ] && variants=seeds,$variants
        (cd "$root" && PYTHONPATH=/tmp/gpu-site:$root python3 benchmarks/train_throughput.py --shape llama-8b \
          --workdir /tmp/ab-bench --variants "$variants" --out "$OUT/ab-$side-$round.json" 2>&1 \
          | grep -v "Loading weights\|Writing model" > "$OUT/ab-$side-$round.txt")
        echo "$side ($(cat "$root/COMMIT" 2>/dev/null || echo worktree)) round $round: $(grep -o '"tokens_per_s": [0-9.]*' "$OUT/ab-$side-$round.json" | tr '\n' ' ')"
      done
    done ;;
esac

#!/usr/bin/env bash
# Preprocessing scale and the training re-measure, on the GPU machine after the Ray wheels are
# staged (../shared/DEVICE.md): `bash benchmarks/device/preprocess_scale.sh MODE` writes to $OUT.
#   throughput: preprocess_throughput.py on 100k rows, every engine in one run, with Ray Data's
#               per-operator stats and the CPU use sampled every 5 s (vmstat)
#   threads-ab: the Ray engines with one tokenizer thread per task (as the code is), then with the
#               tokenizer's own thread pool in every task (as before)
#   neardedupe: near-dedupe alone on $ROWS rows (default 1M; a cold run), with Ray Data's per-operator stats
#   pipeline:   pipeline_gpu.py: 200k raw rows -> medtune preprocess -> 10 LoRA steps on the GPU
#   train:      train_throughput.py on the Llama-3.1-8B shape (the seeds' recipe side by side)
set -uo pipefail
export PYTHONPATH=/tmp/gpu-site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; free -g | head -2; } > "$OUT/device.txt"
vmstat 5 > "$OUT/vmstat-${1:-throughput}.txt" 2>&1 &
case "${1:-throughput}" in
  throughput)
    MEDTUNE_DATA_STATS=1 python3 benchmarks/preprocess_throughput.py --rows 100000 \
      --out "$OUT/preprocess_throughput-h200-16core.json" 2>&1 | tee "$OUT/preprocess_throughput-h200-16core.txt" ;;
  threads-ab)
    # Ray engines only, twice on the same machine: as the code is (one tokenizer thread per
    # task), then with the Rust tokenizer's thread pool left on in the tasks, as before (the
    # local cluster's workers inherit TOKENIZERS_PARALLELISM=true, which the code keeps).
    for threads in one pool; do
      [ "$threads" = pool ] && export TOKENIZERS_PARALLELISM=true
      MEDTUNE_DATA_STATS=1 python3 benchmarks/preprocess_throughput.py --rows 100000 --engines ray \
        --out "$OUT/preprocess_tokenizer_threads-$threads-h200-16core.json" 2>&1 \
        | tee "$OUT/preprocess_tokenizer_threads-$threads-h200-16core.txt"
    done ;;
  neardedupe)
    MEDTUNE_DATA_STATS=1 python3 benchmarks/preprocess_throughput.py --rows "${ROWS:-1000000}" --engines near-dedupe \
      --out "$OUT/preprocess_near_dedupe-h200-16core.json" 2>&1 | tee "$OUT/preprocess_near_dedupe-h200-16core.txt" ;;
  pipeline)
    MEDTUNE_DATA_STATS=1 python3 benchmarks/pipeline_gpu.py --rows 200000 --steps 10 \
      --out "$OUT/pipeline_gpu-h200.json" 2>&1 | tee "$OUT/pipeline_gpu-h200.txt" ;;
  train)
    python3 benchmarks/train_throughput.py --shape llama-8b --out "$OUT/train_throughput-llama8b-h200.json" \
      2>&1 | grep -v "Loading weights\|Writing model shards" | tee "$OUT/train_throughput-llama8b-h200.txt" ;;
esac
kill %1 2>/dev/null

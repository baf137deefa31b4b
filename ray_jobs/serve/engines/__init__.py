"""Generation engines behind one protocol (`Engine` in .base): vLLM on GPUs, transformers +
PEFT everywhere else.

    serve.engine: auto    # vLLM when it is importable and the replica has a GPU, else hf
    serve.engine: vllm    # refuse to start without vLLM and a GPU
    serve.engine: hf      # the continuous HF engine (or PEFT's static batches, see .hf_streams)

A recipe whose adapters vLLM cannot apply (DoRA, modules_to_save, trained biases) is served by
the HF engine under `auto`, with a log line; under `vllm` it is refused at start-up.
"""

from __future__ import annotations

import importlib.util
import logging

from ray_jobs.config import Recipe
from ray_jobs.serve.engines.base import AdapterEvent, Engine

log = logging.getLogger("ray.serve")


class EngineUnavailableError(RuntimeError):
    """serve.engine names an engine this replica cannot run."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_engine(choice: str, recipe: Recipe, *, has_vllm: bool, has_gpu: bool) -> tuple[str, str]:
    """("vllm" | "hf", why) for serve.engine / eval.engine `choice`.

    Raises:
        EngineUnavailableError: `vllm` was asked for and cannot run here.
    """
    from ray_jobs.serve.engines.hf_streams import continuous_blockers

    blockers = continuous_blockers(recipe)
    if choice == "hf":
        return "hf", "asked for"
    missing = [what for what, ok in (("vLLM is not installed (pip install 'medtune[vllm]')", has_vllm),
                                     ("no GPU is visible to this process", has_gpu),
                                     (f"the recipe's adapters use {', '.join(blockers)}", not blockers),
                                     ("model.dtype fp32: vLLM's LoRA kernels take bf16 or fp16",
                                      recipe.model.dtype != "fp32")) if not ok]
    if choice == "vllm" and missing:
        raise EngineUnavailableError(f"engine vllm cannot run here: {'; '.join(missing)}")
    if missing:
        return "hf", "; ".join(missing)
    return "vllm", "vLLM and a GPU are available"


def serving_model(recipe: Recipe):
    """The base model as served: a quantised recipe's adapters go on the unquantised base
    unless serve.keep_quantization is set."""
    if recipe.model.quantization == "none" or recipe.serve.keep_quantization:
        return recipe.model
    return recipe.model.model_copy(update={"quantization": "none"})


def build_engine(recipe: Recipe, model_dir: str, adapter_ranks: list[int], on_adapter_event: AdapterEvent) -> Engine:
    """The engine serve.engine picks for this replica (see choose_engine)."""
    kind, why = choose_engine(recipe.serve.engine, recipe, has_vllm=vllm_available(), has_gpu=gpu_available())
    log.info("serving engine: %s (%s)", kind, why)
    if kind == "vllm":
        from ray_jobs.serve.engines.vllm_async import VLLMEngine

        return VLLMEngine(model_dir, recipe, adapter_ranks, on_adapter_event)
    from ray_jobs.serve.engines.hf_streams import HFEngineStreams

    return HFEngineStreams(model_dir, recipe, serving_model(recipe), on_adapter_event)

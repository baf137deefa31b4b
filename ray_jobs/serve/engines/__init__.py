"""Generation engines behind one protocol (`Engine` in .base): vLLM on GPUs, transformers +
PEFT everywhere else.

    serve.engine: auto    # vLLM when it is importable and the replica has a GPU, else hf
    serve.engine: vllm    # refuse to start without vLLM and a GPU
    serve.engine: hf      # the continuous HF engine (or PEFT's static batches, see .hf_streams)

The choice itself (ray_jobs.core.engines.choose_engine) is shared with evaluation. A recipe
whose adapters vLLM cannot apply (DoRA, modules_to_save, trained biases) is served by
the HF engine under `auto`, with a log line; under `vllm` it is refused at start-up.
"""

from __future__ import annotations

import logging

from ray_jobs.core.engines import EngineUnavailableError, choose_engine, gpu_available, vllm_available
from ray_jobs.core.recipe import Recipe
from ray_jobs.serve.engines.base import AdapterEvent, Engine

log = logging.getLogger("ray.serve")


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


__all__ = ["EngineUnavailableError", "build_engine", "choose_engine", "serving_model"]

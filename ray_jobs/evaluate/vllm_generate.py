"""Evaluation's answers from vLLM (eval.engine: auto on a GPU with vLLM installed, or vllm).

Generating long answers with transformers `generate` is the slowest part of a GPU evaluation;
vLLM's offline engine answers all of a shard's prompts in one call, base and adapter from one
engine (the adapter as a LoRA request). Perplexity stays with transformers: it scores the
same tokens the trainer did. A full fine-tune (no adapter_config.json) gets an engine of its
own for the "after" answers.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from ray_jobs.core.engines import adapter_rank, engine_args, lora_request_fields, vllm_problems
from ray_jobs.core.recipe import GenerationConfig, ModelConfig, Recipe
from ray_jobs.evaluate.generation import sampling_kwargs

LORA_ARGS = ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras")


def vllm_sampling_fields(generation: GenerationConfig, model: ModelConfig) -> dict[str, Any]:
    """vLLM SamplingParams fields equal to what transformers `generate` gets (sampling_kwargs)."""
    settings = sampling_kwargs(generation, model)
    fields: dict[str, Any] = {"max_tokens": generation.max_new_tokens, "skip_special_tokens": True}
    if not settings.pop("do_sample"):
        return {**fields, "temperature": 0.0}
    return {**fields, **settings}


def free_gpu_memory() -> None:
    """Hand transformers' cached blocks back before vLLM sizes its KV cache from free memory."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_with_vllm(
    recipe: Recipe, model_dir: str, adapter_dir: Path, prompt_ids: list[list[int]]
) -> dict[str, tuple[list[str], list[float]]]:
    """{"base": (answers, seconds per row), "adapter": (...)} for the prompts, greedy unless the
    recipe samples. Raises RuntimeError naming why vLLM refuses the adapter."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    is_lora = (adapter_dir / "adapter_config.json").exists()
    ranks = [adapter_rank(adapter_dir)] if is_lora else []
    args = engine_args(recipe, model_dir, ranks, listed=1)
    if is_lora:
        problems = vllm_problems(adapter_dir, args["max_lora_rank"])
        if problems:
            raise RuntimeError(
                f"vLLM cannot evaluate adapter {adapter_dir}: {'; '.join(problems)} (set eval.engine: hf)"
            )
    params = SamplingParams(**vllm_sampling_fields(recipe.eval.generation, recipe.model))
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]

    def answer(llm: Any, lora: Any = None) -> tuple[list[str], list[float]]:
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        per_row = (time.perf_counter() - started) / max(len(prompts), 1)
        return [o.outputs[0].text for o in outputs], [per_row] * len(outputs)

    args.pop("served_model_name", None)
    results: dict[str, tuple[list[str], list[float]]] = {}
    without_lora = {k: v for k, v in args.items() if k not in LORA_ARGS}
    llm = LLM(**(args if is_lora else without_lora))
    try:
        results["base"] = answer(llm)
        if is_lora:
            results["adapter"] = answer(llm, LoRARequest(**lora_request_fields("eval", 1, str(adapter_dir))))
    finally:
        del llm
        free_gpu_memory()
    if not is_lora:  # a full fine-tune is a model of its own
        llm = LLM(**{**without_lora, "model": str(adapter_dir), "tokenizer": str(adapter_dir)})
        try:
            results["adapter"] = answer(llm)
        finally:
            del llm
            free_gpu_memory()
    return results

"""Sampling settings per model family, and how a recipe's generation section resolves them.

The defaults are the entity-extraction seed's ("the evaluation automatically applies
model-specific generation settings"): Llama temperature 1.5 with min_p 0.1, Gemma 1.0 /
top_p 0.95 / top_k 64, Mistral 0.8 / top_p 0.95. Qwen2.5 uses its own generation_config
values (0.7 / 0.8 / 20). Metrics use greedy decoding unless the recipe turns sampling on;
any value set in the recipe wins over the family's.
"""

from __future__ import annotations

from typing import Any

from ray_jobs.core.recipe import GenerationConfig, ModelConfig

FAMILY_DEFAULTS: dict[str, dict[str, float | int]] = {
    "llama": {"temperature": 1.5, "min_p": 0.1},
    "gemma": {"temperature": 1.0, "top_p": 0.95, "top_k": 64},
    "mistral": {"temperature": 0.8, "top_p": 0.95},
    "qwen2": {"temperature": 0.7, "top_p": 0.8, "top_k": 20},
}
_NAME_HINTS = (
    ("gemma", "gemma"),
    ("mistral", "mistral"),
    ("mixtral", "mistral"),
    ("qwen", "qwen2"),
    ("llama", "llama"),
    ("tiny:qwen2", "qwen2"),
    ("tiny:llama", "llama"),
)


def model_family(model: ModelConfig) -> str:
    """The recipe's family, or a guess from the base model's name ('other' if none fits)."""
    if model.family != "auto":
        return model.family
    name = model.base.lower()
    return next((family for hint, family in _NAME_HINTS if hint in name), "other")


def sampling_kwargs(generation: GenerationConfig, model: ModelConfig) -> dict[str, Any]:
    """`generate` keyword arguments: greedy, or the family's sampling defaults + recipe overrides."""
    if generation.greedy:
        return {"do_sample": False}
    settings: dict[str, Any] = dict(FAMILY_DEFAULTS.get(model_family(model), {}))
    for key in ("temperature", "top_p", "top_k", "min_p"):
        value = getattr(generation, key)
        if value is not None:
            settings[key] = value
    return {"do_sample": True, **settings}

"""Generation settings: greedy for metrics, or the entity-extraction seed's per-family sampling."""

from __future__ import annotations

import pytest

from ray_jobs.core.recipe import GenerationConfig, ModelConfig
from ray_jobs.evaluate.generation import model_family, sampling_kwargs


@pytest.mark.parametrize(
    ("base", "family"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama"),
        ("unsloth/medgemma-4b-it", "gemma"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
        ("Qwen/Qwen2.5-14B-Instruct", "qwen2"),
        ("tiny:llama", "llama"),
        ("s3://bucket/models/my-model", "other"),
    ],
)
def test_the_family_is_guessed_from_the_base_model_name(base, family):
    assert model_family(ModelConfig(base=base)) == family


def test_an_explicit_family_beats_the_name():
    assert model_family(ModelConfig(base="s3://bucket/models/ft-7b", family="mistral")) == "mistral"


def test_metrics_decode_greedily_whatever_the_family():
    assert sampling_kwargs(GenerationConfig(), ModelConfig(base="unsloth/gemma-3-4b-it")) == {"do_sample": False}


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        # The seed: "Llama models: temperature = 1.5, min_p = 0.1"
        ("meta-llama/Llama-3.1-8B-Instruct", {"temperature": 1.5, "min_p": 0.1}),
        # "Gemma models: temperature = 1.0, top_p = 0.95, top_k = 64"
        ("unsloth/gemma-3-4b-it", {"temperature": 1.0, "top_p": 0.95, "top_k": 64}),
        # "Mistral models: temperature = 0.8, top_p = 0.95"
        ("mistralai/Mistral-7B-Instruct-v0.3", {"temperature": 0.8, "top_p": 0.95}),
        ("s3://bucket/models/unknown", {}),
    ],
)
def test_sampling_uses_the_seeds_settings_for_each_family(base, expected):
    assert sampling_kwargs(GenerationConfig(greedy=False), ModelConfig(base=base)) == {"do_sample": True, **expected}


def test_values_in_the_recipe_override_the_family_defaults():
    kwargs = sampling_kwargs(
        GenerationConfig(greedy=False, temperature=0.2, top_k=5), ModelConfig(base="meta-llama/Llama-3.1-8B-Instruct")
    )
    assert kwargs == {"do_sample": True, "temperature": 0.2, "min_p": 0.1, "top_k": 5}


def test_vllm_answers_use_the_same_settings_as_transformers_generate():
    from ray_jobs.evaluate.vllm_generate import vllm_sampling_fields

    greedy = vllm_sampling_fields(GenerationConfig(max_new_tokens=64), ModelConfig(base="unsloth/gemma-3-4b-it"))
    assert greedy == {"max_tokens": 64, "skip_special_tokens": True, "temperature": 0.0}
    sampled = vllm_sampling_fields(
        GenerationConfig(greedy=False, top_p=0.9), ModelConfig(base="meta-llama/Llama-3.1-8B-Instruct")
    )
    assert sampled == {"max_tokens": 256, "skip_special_tokens": True, "temperature": 1.5, "min_p": 0.1, "top_p": 0.9}

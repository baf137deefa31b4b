"""Evaluation's answers from vLLM equal transformers' (device machine only; CI has no GPU or vLLM).

A tiny Llama in fp16 and a random LoRA adapter (std 0.1: it changes every answer, and greedy
decoding stays stable under half precision). vLLM's offline engine answers the base model and
the adapter from one engine; PEFT `generate` in fp32 is the reference, compared over the
first 16 tokens as text without whitespace.

    PYTHONPATH=/tmp/vllm-site:/tmp/gpu-site:$PWD python -m pytest -m gpu tests/test_evaluate_vllm_gpu.py
"""

from __future__ import annotations

import json

import pytest

from helpers import Oracle, make_adapter
from ray_jobs.core.recipe import parse_recipe

pytestmark = pytest.mark.gpu

QUESTIONS = [
    f"{lead} {finding}"
    for lead in ("Patient reports", "History of", "Discharged after", "Started on")
    for finding in ("fatigue and anemia", "chest pain", "type 2 diabetes", "metformin 500 mg", "a fever")
]


def test_vllm_answers_for_base_and_adapter_match_peft_generate(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from ray_jobs.evaluate.run import prompt_token_ids
    from ray_jobs.evaluate.vllm_generate import generate_with_vllm
    from ray_jobs.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path / "base", "llama", hidden_size=256)
    adapter = make_adapter(base, tmp_path / "adapter", seed=3, std=0.1)
    recipe = parse_recipe(
        {
            "name": "eval-vllm",
            "model": {"base": str(base), "dtype": "fp16"},
            "data": {"format": "chat", "train": "unused.jsonl"},
            "eval": {"generation": {"max_new_tokens": 16}},
            "serve": {"vllm": {"enforce_eager": True, "gpu_memory_utilization": 0.3}},
        }
    )
    oracle = Oracle(base)
    rows = [
        {"messages": json.dumps([{"role": "user", "content": q}, {"role": "assistant", "content": ""}])}
        for q in QUESTIONS
    ]
    answers = generate_with_vllm(recipe, str(base), adapter, prompt_token_ids(oracle.tokenizer, rows))
    for label, adapter_dir in (("base", None), ("adapter", adapter)):
        outputs, seconds = answers[label]
        expected = [oracle.answer(adapter_dir, q, 16) for q in QUESTIONS]
        same = sum("".join(a.split()) == "".join(b.split()) for a, b in zip(outputs, expected))
        print(f"{label}: {same}/{len(QUESTIONS)} equal PEFT generate; e.g. {outputs[0]!r} vs {expected[0]!r}")
        assert same >= 0.9 * len(QUESTIONS) and len(seconds) == len(QUESTIONS)
    assert answers["adapter"][0] != answers["base"][0], "the adapter must change the answers"

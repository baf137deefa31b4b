"""Tiny offline models: saved like hub models, loaded through the same `from_pretrained` calls,
able to generate, carrying each family's chat template, and identical on every build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_jobs.tiny_model import TEMPLATES, build_tiny_model

MEDTUNE = Path(sys.executable).parent / "medtune"
HUB_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "medtune_tiny.json",
}
CONVERSATION = [
    {"role": "system", "content": "You are a medical entity extractor."},
    {"role": "user", "content": "The patient has diabetes mellitus."},
    {"role": "assistant", "content": '{"entities": [{"label": "Disease", "text": "diabetes mellitus"}]}'},
    {"role": "user", "content": "Prescribed metformin 500mg twice daily."},
]


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


@pytest.fixture(params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tiny_llama_dir: Path) -> Path:
    return tiny_llama_dir if request.param == "llama" else request.getfixturevalue("tiny_qwen_dir")


def test_the_tiny_model_is_saved_like_a_hub_model(model_dir: Path):
    assert {p.name for p in model_dir.iterdir()} >= HUB_FILES
    recorded = json.loads((model_dir / "medtune_tiny.json").read_text())
    assert recorded["arch"] == model_dir.name
    assert recorded["template"] == {"llama": "llama3", "qwen2": "chatml"}[model_dir.name]


def test_the_tiny_model_loads_with_auto_classes_and_generates(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == model_dir.name
    assert model.config.vocab_size == len(tokenizer)

    prompt = tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new_tokens = output[0, prompt["input_ids"].shape[1] :]
    assert len(new_tokens) == 8
    assert all(0 <= int(t) < len(tokenizer) for t in new_tokens)


def test_generation_stops_at_the_family_end_of_turn_tokens(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    template = json.loads((model_dir / "medtune_tiny.json").read_text())["template"]
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in TEMPLATES[template].stop_tokens]
    assert model.generation_config.eos_token_id == stop_ids
    # A dedicated pad token, never an end-of-turn token, so padding cannot read as "stop".
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.pad_token_id not in stop_ids


def test_the_tokenizer_round_trips_clinical_text_without_unknown_tokens(tiny_llama_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "Pt. has DM2 — HbA1c 7.8%; metformin 500 mg bid. Ünïcode ✓ 患者"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_chat_template_renders_its_family_markers(template: str, tiny_tokenizers: dict[str, Path]):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizers[template])
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    for message in CONVERSATION:
        assert message["content"] in rendered
    spec = TEMPLATES[template]
    if spec.bos:
        assert rendered.startswith(spec.bos)
    expected_prompt_end = {
        "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "chatml": "<|im_start|>assistant\n",
        "mistral": "Prescribed metformin 500mg twice daily. [/INST]",
        "gemma": "<start_of_turn>model\n",
    }[template]
    assert rendered.endswith(expected_prompt_end)
    # The assistant turn closes with the family's end-of-turn token.
    assert CONVERSATION[2]["content"] + spec.eos in rendered
    # Each special token is one token, not a string the model must learn to spell.
    for token in spec.special_tokens:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def test_the_mistral_template_folds_the_system_prompt_into_the_first_user_turn(tiny_tokenizers: dict[str, Path]):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizers["mistral"])
    rendered = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert rendered.startswith(
        "<s>[INST] You are a medical entity extractor.\n\nThe patient has diabetes mellitus. [/INST]"
    )


def test_the_gemma_template_calls_the_assistant_model(tiny_tokenizers: dict[str, Path]):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizers["gemma"])
    rendered = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert "<start_of_turn>model\n" in rendered
    assert "assistant" not in rendered


def test_builds_are_deterministic(tmp_path: Path):
    first = build_tiny_model(tmp_path / "a", "llama")
    second = build_tiny_model(tmp_path / "b", "llama")
    weights_a = load_file(first / "model.safetensors")
    weights_b = load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_a_different_seed_gives_different_weights(tmp_path: Path, tiny_llama_dir: Path):
    other = build_tiny_model(tmp_path / "seeded", "llama", seed=1)
    weights = load_file(tiny_llama_dir / "model.safetensors")
    others = load_file(other / "model.safetensors")
    assert not torch.equal(weights["model.embed_tokens.weight"], others["model.embed_tokens.weight"])


def test_unknown_architectures_and_templates_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown tiny architecture 'gpt2'"):
        build_tiny_model(tmp_path / "x", "gpt2")
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        build_tiny_model(tmp_path / "y", "llama", "vicuna")


def test_medtune_tiny_model_cli_builds_a_loadable_qwen2_model(tmp_path: Path):
    out = tmp_path / "cli-qwen"
    result = subprocess.run(
        [str(MEDTUNE), "tiny-model", "--arch", "qwen2", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"tiny qwen2 model saved to {out}" in result.stdout
    assert json.loads((out / "medtune_tiny.json").read_text())["template"] == "chatml"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template

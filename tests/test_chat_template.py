"""model.chat_template: base models that ship no chat template can be trained, evaluated and
served with one from the recipe, and prompt masking still keeps only the assistant's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_jobs import pipeline
from ray_jobs.core.chat_templates import NAMED_TEMPLATES
from ray_jobs.core.modeling import IGNORE_INDEX, load_tokenizer
from ray_jobs.core.recipe import RecipeError, parse_recipe
from ray_jobs.preprocess.formats import RowRejected
from ray_jobs.preprocess.tokenize import tokenize_conversation
from ray_jobs.synthetic import entity_rows
from ray_jobs.tiny_model import build_tiny_model

CONVERSATION = [
    {"role": "system", "content": "Extract the entities."},
    {"role": "user", "content": "Patient on metformin."},
    {"role": "assistant", "content": '{"entities": ["metformin"]}'},
]


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose tokenizer ships no chat template, like Mistral-7B-v0.1 or DialoGPT."""
    directory = Path(build_tiny_model(tmp_path_factory.mktemp("bare") / "tiny", "llama"))
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(str(directory)).chat_template is None
    return directory


def recipe_for(base: Path, root: Path, **model):
    return parse_recipe(
        {
            "name": "bare",
            "model": {"base": str(base), **model},
            "data": {"format": "entities", "train": [str(root / "notes.json")], "max_seq_len": 256},
            "lora": {"r": 4, "alpha": 8, "targets": "attention"},
            "train": {"max_steps": 2, "micro_batch_size": 2, "checkpoint_every": 2, "cpus_per_worker": 0.5},
            "storage": {"root": str(root / "store")},
        }
    )


def test_without_a_template_every_row_is_quarantined_with_its_reason(bare_model):
    with pytest.raises(RowRejected, match="template_error"):
        tokenize_conversation(
            load_tokenizer(str(bare_model)), CONVERSATION, max_seq_len=256, truncation="cut", train_on_inputs=False
        )


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_a_named_template_masks_everything_but_the_assistant_turn(bare_model, name):
    tokenizer = load_tokenizer(str(bare_model), chat_template=NAMED_TEMPLATES[name])
    ids, labels = tokenize_conversation(
        tokenizer, CONVERSATION, max_seq_len=256, truncation="cut", train_on_inputs=False
    )
    target = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert target.lstrip().startswith(CONVERSATION[-1]["content"])
    assert "metformin." not in target and "Extract" not in target  # the prompt stays masked


def test_a_template_can_be_a_name_a_jinja_string_or_a_file(tmp_path, bare_model):
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "t.jinja").write_text(jinja)
    assert recipe_for(bare_model, tmp_path, chat_template="chatml").model.chat_template == NAMED_TEMPLATES["chatml"]
    assert recipe_for(bare_model, tmp_path, chat_template=jinja).model.chat_template == jinja
    assert recipe_for(bare_model, tmp_path, chat_template=str(tmp_path / "t.jinja")).model.chat_template == jinja
    with pytest.raises(RecipeError, match=r"model\.chat_template.*'vicunaa'.*chatml"):
        recipe_for(bare_model, tmp_path, chat_template="vicunaa")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_template_less_base_trains_with_the_recipes_template_and_the_adapter_keeps_it(tmp_path, bare_model):
    (tmp_path / "notes.json").write_text(json.dumps(entity_rows(24, seed=1)))
    recipe = recipe_for(bare_model, tmp_path, chat_template="chatml")
    result = pipeline.train(recipe)
    assert load_tokenizer(result.adapter_uri).chat_template == NAMED_TEMPLATES["chatml"]
    dataset = pipeline.preprocess(recipe)
    assert dataset.stats["rejected"] == 0 and dataset.stats["rows_out"]["train"] > 0

    # Served: the HF engine renders the chat with the recipe's template and answers with the adapter.
    from ray_jobs.serve.engines.base import GenerationRequest
    from ray_jobs.serve.engines.hf_continuous import ContinuousEngine

    engine = ContinuousEngine(str(bare_model), recipe.model.model_copy(update={"dtype": "fp32"}), device="cpu")
    text = engine.tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    key = f"bare@{result.adapter_version}"
    answer = engine.submit(GenerationRequest(ids, key, max_tokens=8, adapter_path=result.adapter_uri)).result(120)
    assert answer.completion_tokens > 0 and answer.finish_reason in ("stop", "length")

"""Adapters medtune publishes are loadable by vLLM / Ray Serve LLM (unit tier: no Ray cluster).

The adapter is made exactly as training makes it (`build_model` + `export_adapter` from the
train loop), published with `publish_adapter`, and then checked against what vLLM refuses.
"""

from __future__ import annotations

import json

import pytest

from ray_jobs.core.engines import vllm_problems
from ray_jobs.core.recipe import RecipeError, parse_recipe
from ray_jobs.core.storage import COMPLETE_MARKER, Storage, adapter_prefix
from ray_jobs.serve.engines.base import AdapterLoadError, check_adapter_dir

PRODUCTION_BASE = "meta-llama/Llama-3.1-8B-Instruct"


def recipe_for(base: str, **lora):
    return parse_recipe(
        {"name": "ner", "model": {"base": base}, "data": {"format": "qa", "train": "qa.jsonl"}, "lora": lora}
    )


def trained_checkpoint(tmp_path, tiny_llama_dir, recipe):
    """A checkpoint directory as the train loop writes it (adapter/ in PEFT format)."""
    from ray.train import Checkpoint

    from ray_jobs.train.loop import ADAPTER_DIR, build_model, export_adapter

    config = {"recipe": recipe.model_dump(mode="json"), "model_dir": str(tiny_llama_dir)}
    model = build_model(config, device="cpu", zero3=False)
    checkpoint_dir = tmp_path / "checkpoint"
    export_adapter(model, checkpoint_dir / ADAPTER_DIR, zero3=False, rank=0)
    return Checkpoint.from_directory(str(checkpoint_dir))


def test_a_published_adapter_is_versioned_names_the_recipe_base_and_is_vllm_loadable(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from ray_jobs.core.artifacts import Lineage
    from ray_jobs.train.run import publish_adapter

    # Train against the tiny model's directory, publish under the production base's name:
    # the published config must carry the recipe's base, never a local path.
    recipe = recipe_for(PRODUCTION_BASE, r=16, targets="attention")
    train_recipe = recipe_for(str(tiny_llama_dir), r=16, targets="attention")
    checkpoint = trained_checkpoint(tmp_path, tiny_llama_dir, train_recipe)
    storage = Storage.from_uri(str(tmp_path / "storage"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for version in ("20250101-120000", "20250102-120000"):
        lineage = Lineage(kind="trained", name="ner", version=version, base_model=recipe.model.base)
        publish_adapter(storage, checkpoint, recipe, version, tokenizer, lineage)

    assert storage.complete_versions(adapter_prefix("ner")) == ["20250101-120000", "20250102-120000"]
    folder = tmp_path / "storage" / adapter_prefix("ner", "20250102-120000")
    assert (folder / COMPLETE_MARKER).is_file()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == PRODUCTION_BASE
    assert not config.get("modules_to_save")
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert vllm_problems(folder) == []
    check_adapter_dir(str(folder))  # and our own engine accepts it


def test_the_published_adapter_loads_with_peft_on_its_base(tmp_path, tiny_llama_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = recipe_for(str(tiny_llama_dir), r=8)
    checkpoint = trained_checkpoint(tmp_path, tiny_llama_dir, recipe)
    with checkpoint.as_directory() as directory:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), f"{directory}/adapter")
        ids = torch.tensor([[1, 2, 3]])
        assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_unservable_modules_to_save_are_refused_unless_the_user_insists(module):
    with pytest.raises(RecipeError) as caught:
        recipe_for("tiny:llama", modules_to_save=[module])
    message = "\n".join(caught.value.problems)
    assert "lora" in message and "allow_unservable_modules" in message and module in message
    recipe = recipe_for("tiny:llama", modules_to_save=[module], allow_unservable_modules=True)
    assert recipe.lora.modules_to_save == [module]


def test_vllm_problems_names_what_vllm_refuses(tmp_path, tiny_llama_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=128, target_modules=["q_proj"], modules_to_save=["lm_head"], bias="lora_only")
    get_peft_model(model, config).save_pretrained(tmp_path / "bad")
    problems = " | ".join(vllm_problems(tmp_path / "bad"))
    for expected in ("bias", "rank 128", "modules_to_save", "weights other than LoRA"):
        assert expected in problems, problems


def test_a_corrupt_adapter_folder_is_refused_before_peft_touches_the_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        check_adapter_dir(str(tmp_path))


def test_incremental_decoding_streams_exactly_the_full_text():
    from ray_jobs.serve.engines.base import IncrementalDecoder
    from ray_jobs.tiny_model import train_tokenizer

    tokenizer = train_tokenizer()
    text = "The patient has diabetes — metformin 500mg, naïve café ✓ twice daily."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)  # multi-byte characters are never split

"""`medtune export`: a merged model answers like adapter-on-base; combined adapters are real adapters.

No Ray needed: adapters are made with PEFT on the tiny model and published to storage the
way training publishes them (versioned folder, complete marker).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_adapter
from ray_jobs import export
from ray_jobs.cli import main as cli
from ray_jobs.core.artifacts import AdapterNotFoundError
from ray_jobs.core.recipe import parse_recipe
from ray_jobs.core.storage import Storage, adapter_prefix


@pytest.fixture
def published(tmp_path: Path, tiny_llama_dir: Path):
    """A recipe whose storage holds adapters `doctor` and `patient` (one version each)."""
    recipe = parse_recipe(
        {
            "name": "export-test",
            "model": {"base": str(tiny_llama_dir)},
            "data": {"format": "entities", "train": ["unused.json"]},
            "storage": {"root": str(tmp_path / "storage")},
        }
    )
    storage = Storage.from_uri(recipe.storage.root)
    for seed, name in enumerate(("doctor", "patient")):
        storage.upload_dir(
            make_adapter(tiny_llama_dir, tmp_path / name, seed, rank=4, std=0.5, targets=["q_proj", "v_proj"]),
            adapter_prefix(name, "v1"),
        )
    return recipe, storage


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_a_merged_model_gives_the_logits_of_the_adapter_on_its_base(published, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, storage = published
    uri = export.merge(recipe, "doctor", dtype="fp32")
    assert uri == storage.uri("models/doctor-v1-merged")
    merged = AutoModelForCausalLM.from_pretrained(uri, dtype=torch.float32)  # plain transformers, no PEFT
    assert not any("lora" in name for name, _ in merged.named_parameters())
    on_base = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), storage.path("adapters/doctor/v1")
    )
    ids = torch.randint(5, 600, (2, 32))
    torch.testing.assert_close(logits(merged, ids), logits(on_base, ids), rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert not torch.allclose(logits(merged, ids), logits(base, ids), atol=1e-3)
    assert (Path(uri) / "tokenizer.json").exists()
    assert json.loads((Path(uri) / "lineage.json").read_text())["sources"] == [
        {"adapter": "doctor", "version": "v1", "weight": 1.0}
    ]


def test_a_bf16_merge_through_the_cli_writes_to_the_chosen_place(published, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    recipe, _ = published
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps(recipe.model_dump(mode="json")))
    assert cli(["export", str(recipe_file), "--adapter", "patient@v1", "--out", str(tmp_path / "standalone")]) == 0
    assert capsys.readouterr().out.strip().rstrip("/") == str(tmp_path / "standalone")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "standalone")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_combining_with_all_weight_on_one_adapter_reproduces_it(published, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, storage = published
    uri = export.combine(recipe, ["doctor", "patient"], [1.0, 0.0], name="blend", method="linear")
    version = uri.rstrip("/").rsplit("/", 1)[-1]
    assert storage.complete_versions(adapter_prefix("blend")) == [version]
    lineage = json.loads(Path(uri, "lineage.json").read_text())
    assert [s["adapter"] for s in lineage["sources"]] == ["doctor", "patient"] and lineage["method"] == "linear"
    assert json.loads(Path(uri, "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama_dir)

    def load(path):
        return PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), path
        )

    ids = torch.randint(5, 600, (1, 24))
    # Linear combination weights the B and A matrices each by sqrt(weight) in PEFT, so the
    # product carries the weight: all of it on `doctor` is `doctor` exactly.
    torch.testing.assert_close(
        logits(load(uri), ids), logits(load(storage.path("adapters/doctor/v1")), ids), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_ties_and_dare_produce_a_loadable_adapter_between_its_sources(published, tiny_llama_dir, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, storage = published
    torch.manual_seed(0)
    uri = export.combine(
        recipe, ["doctor", "patient"], [0.5, 0.5], name=f"blend-{method.replace('_', '-')}", method=method, density=0.5
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), uri)
    tensors = [p for n, p in model.named_parameters() if "lora_" in n]
    assert tensors and all(t.abs().sum() > 0 for t in tensors)


def test_bad_export_requests_name_what_to_change(published):
    recipe, _ = published
    with pytest.raises(AdapterNotFoundError, match="adapter 'nurse' not found.*doctor"):
        export.merge(recipe, "nurse")
    with pytest.raises(export.ExportError, match="needs --density"):
        export.combine(recipe, ["doctor", "patient"], [0.5, 0.5], name="x", method="ties")
    with pytest.raises(export.ExportError, match="2 values for 1 adapters|at least two"):
        export.combine(recipe, ["doctor"], [0.5, 0.5], name="x")
    with pytest.raises(export.ExportError, match="not one of"):
        export.combine(recipe, ["doctor", "patient"], [0.5, 0.5], name="x", method="average")


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_export_reads_back_with_llama_cpps_reader(published, tiny_llama_dir, tmp_path, quant):
    """Round trip through the `gguf` package's reader: every tensor under llama.cpp's name and
    shape, the architecture's metadata, the tokenizer and the chat template. (llama-cpp-python
    has no wheel on the package index, so its greedy tokens are not compared here.)"""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    recipe, _ = published
    out = tmp_path / "merged"
    assert (
        cli(
            [
                "export",
                str(_recipe_file(recipe, tmp_path)),
                "--adapter",
                "doctor",
                "--out",
                str(out),
                "--gguf",
                "--quant",
                quant,
            ]
        )
        == 0
    )
    reader = gguf.GGUFReader(out / f"model-{quant}.gguf")
    config = json.loads((out / "config.json").read_text())
    fields = {name: field for name, field in reader.fields.items()}

    def value(key):
        field = fields[key]
        return field.contents()

    assert value("general.architecture") == "llama"
    assert value("llama.context_length") == config["max_position_embeddings"]
    assert value("llama.block_count") == config["num_hidden_layers"]
    assert value("llama.attention.head_count_kv") == config["num_key_value_heads"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    assert len(value("tokenizer.ggml.tokens")) == len(tokenizer.get_vocab())
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    hf = load_file(str(out / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {names.get_name(n, try_suffixes=(".weight",)) for n in hf}
    for hf_name, weight in hf.items():
        tensor = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        assert [int(d) for d in tensor.shape] == list(reversed(weight.shape))  # GGUF lists dims fastest first
        if weight.ndim == 2:
            want = gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else gguf.GGMLQuantizationType.F16
            assert tensor.tensor_type == want
    # The token embedding comes back as written (f16: to f16 precision).
    embedding = tensors["token_embd.weight"]
    if quant == "f16":
        back = embedding.data.reshape(hf["model.embed_tokens.weight"].shape).astype("float32")
        torch.testing.assert_close(
            torch.from_numpy(back), hf["model.embed_tokens.weight"].float(), rtol=1e-3, atol=1e-3
        )


def _recipe_file(recipe, tmp_path: Path) -> Path:
    from ray_jobs.core.recipe import recipe_to_yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_to_yaml(recipe))
    return path

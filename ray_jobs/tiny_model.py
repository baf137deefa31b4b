"""Tiny real-architecture causal LMs with in-process tokenizers, for tests and the quickstart.

    medtune tiny-model --arch llama --out /tmp/tiny-llama
    medtune tiny-model --arch qwen2 --template chatml --out /tmp/tiny-qwen

The result is saved exactly like a hub model (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template, generation_config.json) and is
loaded through the same `from_pretrained` calls as a real 8B model, so every code path the
product runs on a GPU also runs here. Nothing is downloaded.

Design decisions:
- Byte-level BPE trained with `tokenizers` on a small built-in corpus: any UTF-8 text
  encodes without unknown tokens, and the vocabulary is small enough to train in a second.
- Chat templates reproduce the structure and special tokens of the real families (Llama 3,
  Qwen2.5/ChatML, Mistral, Gemma), so masking and generation code meets the same traps.
- Weights come from a fixed seed: every node that builds `tiny:llama` gets the same model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

TINY_VERSION = "3"
"""Bump when the tiny model changes, so cached copies in storage are rebuilt."""


@dataclass(frozen=True)
class TemplateSpec:
    chat_template: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    stop_tokens: tuple[str, ...]
    """Tokens that end an assistant turn (the generation config's eos ids)."""


LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Mistral has no system role: like its v0.3 template, the system prompt joins the first user turn.
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('Only user and assistant roles are supported after the system prompt') }}"
    "{%- endif %}{%- endfor %}"
)

GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

TEMPLATES: dict[str, TemplateSpec] = {
    "llama3": TemplateSpec(
        LLAMA3_TEMPLATE,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
    ),
    "chatml": TemplateSpec(
        CHATML_TEMPLATE,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
    ),
    "mistral": TemplateSpec(
        MISTRAL_TEMPLATE,
        ("<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        stop_tokens=("</s>",),
    ),
    "gemma": TemplateSpec(
        GEMMA_TEMPLATE,
        ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<end_of_turn>",
        stop_tokens=("<end_of_turn>", "<eos>"),
    ),
}

DEFAULT_TEMPLATE = {"llama": "llama3", "qwen2": "chatml"}
PAD_TOKEN = "<|pad|>"

_CORPUS = """\
The patient has diabetes mellitus and hypertension. Prescribed metformin 500mg twice daily.
Patient presents with chest pain, shortness of breath and fever. Blood pressure 140/90 mmHg.
Extract the entities from the text and return them in a structured JSON format.
You are a medical entity extractor from clinical texts. You are a helpful medical assistant.
{"entities": [{"label": "Disease", "text": "asthma"}, {"label": "Medication", "text": "aspirin"}]}
Disease Medication Dosage Frequency Symptom Procedure Anatomy Test Result Domain Pattern Variable
## Thinking ## Final Response The most likely diagnosis is pneumonia. Recommend a chest X-ray.
What are the side effects of ibuprofen? Nausea, heartburn and, rarely, stomach bleeding.
SDTM domain AE VS IE CM MH LB DM direct findings conditional supplemental AETERM VSORRES.
Call emergency services now if you have severe chest pain. I cannot provide a diagnosis.
[EMAIL] [PHONE] [SSN] [MRN] [DATE] [URL] [IP] 0123456789 mg ml kg bid tid qd prn po iv
"""


def _synthetic_vocabulary() -> list[str]:
    """The synthetic entity values, so each becomes a whole token or two: the quickstart and
    the learnability test then teach copying spans, not spelling them byte by byte."""
    import json

    from ray_jobs.synthetic import POOLS

    # Both spellings a value takes: after a space in the note, and quoted in the JSON answer.
    # Byte-level BPE gives them different tokens; without both, the answer must be spelt.
    spaced = [" ".join(pool) for pool in POOLS.values()]
    quoted = [" ".join(json.dumps({"text": value}) for value in pool) for pool in POOLS.values()]
    return (spaced + quoted) * 8


def train_tokenizer(template: str = "llama3", vocab_size: int = 2048, extra_corpus: list[str] | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` carrying the chat template of `template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TEMPLATES[template]
    specials = [*spec.special_tokens, PAD_TOKEN]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = _CORPUS.splitlines() * 4 + _synthetic_vocabulary() + list(extra_corpus or [])
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=PAD_TOKEN,
        chat_template=spec.chat_template,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    return fast


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    template: str | None = None,
    *,
    hidden_size: int = 128,
    layers: int = 4,
    seed: int = 0,
) -> Path:
    """Build, save and return the directory of a tiny `arch` model with a trained tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in DEFAULT_TEMPLATE:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(DEFAULT_TEMPLATE)}")
    template = template or DEFAULT_TEMPLATE[arch]
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of {sorted(TEMPLATES)}")
    spec = TEMPLATES[template]
    tokenizer = train_tokenizer(template)
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if spec.bos else None,
        eos_token_id=tokenizer.convert_tokens_to_ids(spec.eos),
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in spec.stop_tokens]
    model.generation_config = GenerationConfig(
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=shape["bos_token_id"],
        do_sample=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "medtune_tiny.json").write_text(
        json.dumps({"arch": arch, "template": template, "version": TINY_VERSION, "seed": seed}) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune tiny-model", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(DEFAULT_TEMPLATE), default="llama")
    parser.add_argument(
        "--template",
        choices=sorted(TEMPLATES),
        default=None,
        help="chat template family (default: llama3 for llama, chatml for qwen2)",
    )
    parser.add_argument("--out", required=True, help="directory to save the model to")
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out, args.arch, args.template)
    print(f"tiny {args.arch} model saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

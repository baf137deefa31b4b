"""Chat templates for base models that ship none (`model.chat_template`).

medtune renders every row with the tokenizer's chat template (that is how it masks the
prompt), so a base model without one (Mistral-7B-v0.1, DialoGPT, most pre-trained bases)
needs one from the recipe: a name below, a Jinja string, or a file holding one. The template
is set on the tokenizer wherever medtune loads it (preprocessing, training, evaluation,
serving) and saved with the adapter's tokenizer, so every stage speaks the same format.

Named templates are the formats' reference renderings (those the tiny models use, plus
Alpaca's instruction format); each renders a prompt that is a prefix of the full
conversation, which the masking needs.
"""

from __future__ import annotations

from pathlib import Path

from ray_jobs.tiny_model import CHATML_TEMPLATE, GEMMA_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE

ALPACA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

NAMED_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
    "gemma": GEMMA_TEMPLATE,
    "alpaca": ALPACA_TEMPLATE,
}


def is_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def resolve_chat_template(value: str, base_dir: Path | None = None) -> str:
    """The Jinja text of `value`: a named template, a Jinja string, or a file (relative paths
    from `base_dir`, the recipe's folder). Raises ValueError naming the choices."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if is_jinja(value):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        return path.read_text()
    raise ValueError(
        f"{value!r} is not a named template ({', '.join(NAMED_TEMPLATES)}), a Jinja string or a file that exists"
    )

"""What vLLM (and so Ray Serve LLM) demands of a LoRA adapter folder, checked without vLLM.

    problems = vllm_problems("medtune-output/adapters/ner/20250101-120000")

vLLM's `PEFTHelper.validate_legal` refuses adapter bias, DoRA and ranks above
`--max-lora-rank`; its loader refuses weights for modules it cannot apply LoRA to, which
is what `modules_to_save` on embeddings or `lm_head` produces. Ray Serve LLM caches S3
look-ups per adapter id, so a folder must never be overwritten: publish a new version.
"""

from __future__ import annotations

import json
from pathlib import Path

UNSERVABLE_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings")
VLLM_DEFAULT_MAX_LORA_RANK = 16
"""vLLM's default `--max-lora-rank`; serve higher ranks with that flag raised."""


def vllm_problems(adapter_dir: str | Path, max_lora_rank: int = 64) -> list[str]:
    """Reasons vLLM would refuse this adapter folder (empty: loadable)."""
    folder = Path(adapter_dir)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return [f"{folder}: no adapter_config.json"]
    config = json.loads(config_path.read_text())
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}: vLLM serves LoRA only")
    if not config.get("base_model_name_or_path"):
        problems.append("adapter_config.json has no base_model_name_or_path")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}: vLLM does not support adapter bias")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        problems.append(f"rank {max(ranks)} exceeds max_lora_rank {max_lora_rank}")
    saved = [m for m in config.get("modules_to_save") or [] if any(u in m for u in UNSERVABLE_MODULES)]
    if saved:
        problems.append(f"modules_to_save {saved}: vLLM cannot serve full embedding / lm_head copies")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        problems.append("no adapter_model.safetensors")
    else:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
        odd = [k for k in keys if "lora_A" not in k and "lora_B" not in k]
        if odd:
            problems.append(f"weights other than LoRA A/B matrices (e.g. {odd[0]}): vLLM refuses them")
    return problems

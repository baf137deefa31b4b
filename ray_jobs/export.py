"""Export: merge an adapter into its base, or combine several adapters into one.

    medtune export RECIPE --adapter quickstart-ner[@VERSION] [--out DIR_OR_S3] [--dtype bf16]
    medtune export RECIPE --adapter quickstart-ner --gguf [--quant f16|q8_0]
    medtune export RECIPE --combine doctor,patient --weights 0.7,0.3 --method ties \
        --density 0.5 --name clinic-blend

Merging (`merge_and_unload`) writes a standalone model (safetensors + tokenizer) that any
transformers or vLLM user can load without PEFT, under `<storage>/models/<name>-<version>-merged/`
unless `--out` says where; `--gguf` adds the same model as one GGUF file (Llama, Mistral and
Qwen2 families with byte-level BPE tokenizers) for llama.cpp and Ollama. Combining (peft `add_weighted_adapter`: linear, TIES, DARE and their
variants) writes a new adapter version under `<storage>/adapters/<name>/<version>/`, with a
lineage.json naming its sources and weights, as the audience-adapter seed describes; it is
then served and evaluated like any trained adapter.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ray_jobs.core.artifacts import Lineage, resolve_adapter, stamp_artifact
from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.modeling import DTYPES
from ray_jobs.core.recipe import Recipe
from ray_jobs.core.storage import Storage, adapter_prefix, model_prefix

COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)


class ExportError(MedtuneError):
    """The export cannot be done; the message names what exists or what to change."""


def _adapter_dir(storage: Storage, spec: str, scratch: Path) -> tuple[str, str, Path]:
    name, version = resolve_adapter(storage, spec)
    local = storage.download_dir(adapter_prefix(name, version), scratch / f"{name}@{version}", require_complete=True)
    return name, version, Path(local)


def _base(recipe: Recipe, storage: Storage, dtype: str):
    import torch

    from ray_jobs.core.modeling import load_model, resolve_model_dir

    if recipe.model.quantization != "none":
        # Merging into 4/8-bit weights would re-quantise the sum and lose the adapter's update.
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "none"})})
    model_dir = resolve_model_dir(recipe.model, storage)
    model = load_model(recipe.model, model_dir)
    return model.to(getattr(torch, DTYPES[dtype])), model_dir


def merge(recipe: Recipe, adapter: str, *, out: str | None = None, dtype: str = "bf16", gguf: str | None = None) -> str:
    """Merge `adapter` into the recipe's base and save a standalone model; returns its URI.
    `gguf` (f16 or q8_0) also writes the merged model as `model-<gguf>.gguf` for llama.cpp."""
    from peft import PeftModel

    from ray_jobs.core.modeling import load_tokenizer

    storage = Storage.from_uri(recipe.storage.root)
    with tempfile.TemporaryDirectory(prefix="medtune-export-") as tmp:
        scratch = Path(tmp)
        name, version, local = _adapter_dir(storage, adapter, scratch)
        base, model_dir = _base(recipe, storage, dtype)
        merged = PeftModel.from_pretrained(base, str(local)).merge_and_unload()
        target = scratch / "merged"
        merged.save_pretrained(target, safe_serialization=True)
        tokenizer_dir = str(local) if (local / "tokenizer_config.json").exists() else model_dir
        load_tokenizer(tokenizer_dir, chat_template=recipe.model.chat_template).save_pretrained(target)
        if gguf:
            write_gguf(target, target / f"model-{gguf}.gguf", quant=gguf, name=f"{name}-{version}")
        stamp_artifact(
            target,
            Lineage(
                kind="merged",
                name=f"{name}-{version}-merged",
                version=version,
                base_model=recipe.model.base,
                dtype=dtype,
                sources=({"adapter": name, "version": version, "weight": 1.0},),
            ),
        )
        if out:
            destination, rel = Storage.from_uri(out), ""
        else:
            destination, rel = storage, model_prefix(f"{name}-{version}-merged")
        return destination.upload_dir(target, rel, info={"merged_from": f"{name}@{version}"})


GGUF_ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
"""HF model_type -> gguf.MODEL_ARCH: the families medtune's recipes train."""
GGUF_QUANTS = ("f16", "q8_0")


def write_gguf(model_dir: Path, path: Path, *, quant: str = "f16", name: str = "model") -> Path:
    """Write a saved HF model (merged, standalone) as one GGUF file with llama.cpp's `gguf`
    package: its tensors under llama.cpp's names (Q/K rows permuted as llama.cpp's converter
    does for the Llama family), the architecture's metadata, and the tokenizer's BPE vocab,
    merges, special ids and chat template."""
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"--gguf: model_type {config.get('model_type')!r} is not one of {sorted(GGUF_ARCHITECTURES)}; "
            "use llama.cpp's convert_hf_to_gguf.py on the merged model"
        )
    if quant not in GGUF_QUANTS:
        raise ExportError(f"--quant {quant!r} is not one of {', '.join(GGUF_QUANTS)}")
    arch = gguf.MODEL_ARCH[GGUF_ARCHITECTURES[config["model_type"]]]
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    kv_heads = config.get("num_key_value_heads") or heads
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    _gguf_tokenizer(writer, AutoTokenizer.from_pretrained(model_dir), model_dir)

    names = gguf.get_tensor_name_map(arch, layers)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    for hf_name, tensor in state.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"--gguf: no llama.cpp name for tensor {hf_name}")
        data = tensor.float().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp's rotary embedding pairs dimensions differently from HF's: permute as its converter does.
            n = heads if hf_name.endswith("q_proj.weight") else kv_heads
            data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        if data.ndim == 1:
            writer.add_tensor(gguf_name, data.astype("float32"))
        elif quant == "q8_0" and data.shape[-1] % 32 == 0:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, data.astype("float16"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_tokenizer(writer, tokenizer, model_dir: Path) -> None:
    """A byte-level BPE tokenizer (what the Llama 3, Qwen2 and the tiny models use) as
    llama.cpp's "gpt2" tokenizer model."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    if spec.get("model", {}).get("type") != "BPE":
        raise ExportError("--gguf: only byte-level BPE tokenizers are written; use llama.cpp's converter")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_ids) | {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def combine(
    recipe: Recipe,
    adapters: list[str],
    weights: list[float],
    *,
    name: str,
    method: str = "linear",
    density: float | None = None,
    svd_rank: int | None = None,
) -> str:
    """Combine adapters into one new adapter version; returns its URI."""
    from peft import PeftModel

    if method not in COMBINATIONS:
        raise ExportError(f"--method {method!r} is not one of {', '.join(COMBINATIONS)}")
    if len(adapters) < 2:
        raise ExportError("--combine needs at least two adapters")
    if len(weights) != len(adapters):
        raise ExportError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    if method.startswith(("ties", "dare", "magnitude")) and density is None:
        raise ExportError(f"--method {method} needs --density (the share of each update kept, e.g. 0.5)")
    storage = Storage.from_uri(recipe.storage.root)
    with tempfile.TemporaryDirectory(prefix="medtune-combine-") as tmp:
        scratch = Path(tmp)
        sources = [_adapter_dir(storage, spec, scratch) for spec in adapters]
        ranks = {json.loads((d / "adapter_config.json").read_text())["r"] for _, _, d in sources}
        if method in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune") and len(ranks) > 1:
            raise ExportError(
                f"--method {method} needs adapters of one rank (got {sorted(ranks)}); use cat or an *_svd method"
            )
        base, _ = _base(recipe, storage, "fp32")
        slots = [f"a{i}" for i in range(len(sources))]
        model = PeftModel.from_pretrained(base, str(sources[0][2]), adapter_name=slots[0])
        for slot, (_, _, directory) in zip(slots[1:], sources[1:]):
            model.load_adapter(str(directory), adapter_name=slot)
        kwargs: dict[str, Any] = {"combination_type": method}
        if density is not None:
            kwargs["density"] = density
        if svd_rank is not None:
            kwargs["svd_rank"] = svd_rank
        model.add_weighted_adapter(slots, weights, "combined", **kwargs)
        target = scratch / "combined"
        model.save_pretrained(target, selected_adapters=["combined"], safe_serialization=True)
        # PEFT saves a non-default adapter in a sub-folder named after it.
        produced = target / "combined" if (target / "combined").is_dir() else target
        tokenizer_dir = sources[0][2]
        for file in tokenizer_dir.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (produced / file.name).write_bytes(file.read_bytes())
        version = time.strftime("%Y%m%d-%H%M%S")
        stamp_artifact(
            produced,
            Lineage(
                kind="combined",
                name=name,
                version=version,
                base_model=recipe.model.base,
                method=method,
                density=density,
                sources=tuple({"adapter": n, "version": v, "weight": w} for (n, v, _), w in zip(sources, weights)),
            ),
        )
        return storage.upload_dir(produced, adapter_prefix(name, version), info={"base_model": recipe.model.base})


def main(argv: list[str]) -> int:
    from ray_jobs.core.errors import report
    from ray_jobs.core.recipe import load_recipe, recipe_parser

    parser = recipe_parser("medtune export", "merge an adapter into its base, or combine adapters into one")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--adapter", help="NAME[@VERSION] to merge into the base model")
    what.add_argument("--combine", help="comma-separated NAME[@VERSION] list to combine into one adapter")
    parser.add_argument("--out", help="merge: where to write the model (directory or s3://); default <storage>/models/")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="merge: weight dtype (default bf16)")
    parser.add_argument("--gguf", action="store_true", help="merge: also write the model as GGUF (llama.cpp, Ollama)")
    parser.add_argument("--quant", choices=GGUF_QUANTS, default="f16", help="--gguf: f16 or q8_0 (default f16)")
    parser.add_argument("--weights", help="combine: comma-separated weights, one per adapter (default equal)")
    parser.add_argument("--method", default="linear", help=f"combine: {', '.join(COMBINATIONS)}")
    parser.add_argument("--density", type=float, help="combine (ties/dare/magnitude): share of each update kept")
    parser.add_argument("--svd-rank", type=int, help="combine (*_svd): rank of the result")
    parser.add_argument("--name", help="combine: name of the new adapter")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.adapter:
            uri = merge(recipe, args.adapter, out=args.out, dtype=args.dtype, gguf=args.quant if args.gguf else None)
        else:
            adapters = [a for a in args.combine.split(",") if a]
            try:
                weights = (
                    [float(w) for w in args.weights.split(",")] if args.weights else [1 / len(adapters)] * len(adapters)
                )
            except ValueError:
                raise ExportError(f"--weights must be numbers, got {args.weights!r}") from None
            if not args.name:
                raise ExportError("--combine needs --name for the new adapter")
            uri = combine(
                recipe,
                adapters,
                weights,
                name=args.name,
                method=args.method,
                density=args.density,
                svd_rank=args.svd_rank,
            )
    except (MedtuneError, FileNotFoundError) as error:
        return report(error)
    print(uri)
    return 0

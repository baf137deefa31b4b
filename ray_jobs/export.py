"""Export: merge an adapter into its base, or combine several adapters into one.

    medtune export RECIPE --adapter quickstart-ner[@VERSION] [--out DIR_OR_S3] [--dtype bf16]
    medtune export RECIPE --combine doctor,patient --weights 0.7,0.3 --method ties \
        --density 0.5 --name clinic-blend

Merging (`merge_and_unload`) writes a standalone model (safetensors + tokenizer) that any
transformers or vLLM user can load without PEFT, under `<storage>/models/<name>-<version>-merged/`
unless `--out` says where. Combining (peft `add_weighted_adapter`: linear, TIES, DARE and their
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


def merge(recipe: Recipe, adapter: str, *, out: str | None = None, dtype: str = "bf16") -> str:
    """Merge `adapter` into the recipe's base and save a standalone model; returns its URI."""
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
        load_tokenizer(str(local) if (local / "tokenizer_config.json").exists() else model_dir).save_pretrained(target)
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
    parser.add_argument("--weights", help="combine: comma-separated weights, one per adapter (default equal)")
    parser.add_argument("--method", default="linear", help=f"combine: {', '.join(COMBINATIONS)}")
    parser.add_argument("--density", type=float, help="combine (ties/dare/magnitude): share of each update kept")
    parser.add_argument("--svd-rank", type=int, help="combine (*_svd): rank of the result")
    parser.add_argument("--name", help="combine: name of the new adapter")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.adapter:
            uri = merge(recipe, args.adapter, out=args.out, dtype=args.dtype)
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

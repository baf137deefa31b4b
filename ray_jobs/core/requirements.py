"""The optional packages a recipe needs, checked before any data is read or worker started.

A recipe that asks for Liger kernels, 4/8-bit weights, DeepSpeed or a tracker fails
inside a worker, minutes in, when the package is missing from the image. Each need here is
the recipe key that asks for it and the line that installs it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.recipe import Recipe


class MissingPackageError(MedtuneError):
    """A package the recipe needs is not installed; the message has the install line."""


@dataclass(frozen=True)
class Need:
    key: str
    """The recipe key that asks for the package, e.g. train.liger_kernels."""
    module: str
    install: str
    """pip arguments that install it, e.g. "medtune[gpu]"."""


def needs(recipe: Recipe, stage: str) -> list[Need]:
    """What `stage` (train, evaluate or serve) of `recipe` needs beyond medtune's core."""
    found = []
    if stage == "train":
        train = recipe.train
        if train.liger_kernels:
            found.append(Need("train.liger_kernels", "liger_kernel", "medtune[gpu]"))
        if train.deepspeed != "none":
            found.append(Need("train.deepspeed", "deepspeed", "deepspeed"))
        if train.tracking.mlflow_uri:
            found.append(Need("train.tracking.mlflow_uri", "mlflow", "mlflow"))
        if train.tracking.wandb_project:
            found.append(Need("train.tracking.wandb_project", "wandb", "wandb"))
    if stage in ("train", "evaluate", "serve") and recipe.model.quantization != "none":
        found.append(Need("model.quantization", "bitsandbytes", "bitsandbytes"))
    # vLLM (serve.engine / eval.engine: vllm) is checked where the engine runs, by
    # core.engines.choose_engine, which also knows about the GPU, the dtype and the adapters.
    return found


def check_packages(recipe: Recipe, stage: str) -> None:
    """Raise MissingPackageError naming every missing package, its key and install line."""
    missing = [need for need in needs(recipe, stage) if importlib.util.find_spec(need.module) is None]
    if missing:
        lines = "; ".join(f"{n.key} needs {n.module}: pip install '{n.install}'" for n in missing)
        raise MissingPackageError(
            f"{lines} (install it here and bake it into the cluster's image, e.g. images/gpu.Dockerfile, "
            f"or change the key)"
        )

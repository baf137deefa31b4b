"""The training stage's driver: checks, Ray Train `TorchTrainer`, final adapter export.

    python -m ray_jobs.train RECIPE [--set train.max_steps=50]
    medtune train RECIPE
    ray job submit --working-dir . -- python -m ray_jobs.train RECIPE

What it does, in order:
1. Fails fast, before any worker starts, on what cannot work: a missing DeepSpeed profile,
   more GPUs than the cluster has, a dataset with too few rows for one optimizer step.
2. Runs preprocessing when the dataset is missing (or reuses it by fingerprint).
3. Trains with `TorchTrainer` (each worker runs a `ray_jobs.train.trainer.Trainer` built from
   the `WorkerPlan` made here), checkpoints under
   `<storage>/runs/<run>/`, and recovers from worker failures via `FailureConfig`.
4. Publishes the best checkpoint's adapter to `<storage>/adapters/<name>/<version>/` in
   PEFT format, with the tokenizer and `lineage.json`, and marks it complete last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_jobs.core.artifacts import DatasetRef, Lineage, stamp_artifact
from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.recipe import Recipe
from ray_jobs.core.requirements import check_packages
from ray_jobs.core.storage import Storage, adapter_prefix, run_prefix
from ray_jobs.train.identity import claim_run, finish_run
from ray_jobs.train.plan import PLAN_KEY, WorkerPlan
from ray_jobs.train.tracking import TensorboardFolder

log = logging.getLogger("medtune.train")
DEEPSPEED_PROFILES = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


class TrainError(MedtuneError):
    """The run cannot start or did not produce an adapter; the message names the cause."""


@dataclass(frozen=True)
class TrainResult:
    run: str
    adapter_name: str
    adapter_version: str
    adapter_uri: str
    metrics: dict[str, Any]


def deepspeed_config(recipe: Recipe) -> dict[str, Any] | None:
    """The DeepSpeed profile as a dict: a built-in name or a user JSON file."""
    name = recipe.train.deepspeed
    if name == "none":
        return None
    path = DEEPSPEED_PROFILES / f"{name}.json" if name in ("zero2", "zero3") else Path(name)
    if not path.is_file():
        raise TrainError(f"train.deepspeed: profile file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainError(f"train.deepspeed: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def check_resources(recipe: Recipe) -> None:
    import ray

    wanted_gpus = recipe.train.workers * recipe.train.gpus_per_worker
    available = ray.cluster_resources()
    have_gpus = available.get("GPU", 0)
    autoscaling = os.environ.get("MEDTUNE_CLUSTER_AUTOSCALES") == "1"
    if wanted_gpus > have_gpus and not autoscaling:
        raise TrainError(
            f"train.workers x train.gpus_per_worker asks for {wanted_gpus} GPUs but the Ray cluster has "
            f"{have_gpus:g}; lower them (gpus_per_worker: 0 trains on CPU) or set MEDTUNE_CLUSTER_AUTOSCALES=1"
        )
    wanted_cpus = recipe.train.workers * recipe.train.cpus_per_worker
    have_cpus = available.get("CPU", 0)
    if wanted_cpus > have_cpus - 1 and not autoscaling:
        # Workers holding every CPU starve Ray Data's read tasks and the run hangs silently.
        raise TrainError(
            f"train.workers x train.cpus_per_worker asks for {wanted_cpus:g} CPUs but the Ray "
            f"cluster has {have_cpus:g} and Ray Data needs at least one free CPU to feed the "
            f"workers; lower train.cpus_per_worker (fractions such as 0.5 are allowed)"
        )


def parent_adapter(recipe: Recipe, storage: Storage) -> tuple[str, str] | None:
    """(name, version) of lora.init_from, checked against the recipe: full fine-tuning cannot
    continue an adapter, and the parent must have this recipe's rank and target modules."""
    spec = recipe.lora.init_from
    if spec is None:
        return None
    from ray_jobs.core.artifacts import resolve_adapter
    from ray_jobs.train.model_setup import lora_targets

    if recipe.train.method != "lora":
        raise TrainError("lora.init_from continues a LoRA adapter: it needs train.method: lora")
    name, version = resolve_adapter(storage, spec)
    parent = json.loads(storage.read_text(posixpath.join(adapter_prefix(name, version), "adapter_config.json")))
    problems = []
    if parent.get("r") != recipe.lora.r:
        problems.append(f"rank {parent.get('r')} (lora.r is {recipe.lora.r})")
    wanted = lora_targets(recipe.lora.targets)
    theirs = parent.get("target_modules")
    if wanted != "all-linear" and sorted(set(theirs or [])) != sorted(set(wanted)):
        problems.append(f"target modules {sorted(set(theirs or []))} (lora.targets gives {sorted(set(wanted))})")
    if problems:
        raise TrainError(f"lora.init_from: {name}@{version} has {' and '.join(problems)}; match them or train anew")
    return name, version


def steps_per_epoch(train_rows: int, recipe: Recipe) -> int:
    t = recipe.train
    rows_per_worker = train_rows // t.workers
    micro_batches = math.ceil(rows_per_worker / t.micro_batch_size)
    return micro_batches // t.grad_accum


def preflight(recipe: Recipe) -> dict[str, Any] | None:
    """What can fail before any data is read or worker started: the DeepSpeed profile (returned),
    the optional packages the recipe needs and the Ray cluster's resources. Raises TrainError
    or MissingPackageError."""
    import ray

    ds_config = deepspeed_config(recipe)
    check_packages(recipe, "train")
    parent_adapter(recipe, Storage.from_uri(recipe.storage.root))
    if not ray.is_initialized():
        ray.init()
    check_resources(recipe)
    return ds_config


def run(
    recipe: Recipe,
    dataset: DatasetRef,
    *,
    run_name: str | None = None,
    force: bool = False,
    fault_at_step: int | None = None,
) -> TrainResult:
    """Train on `dataset` (preprocess's output for this recipe) and publish the adapter.

    The run resumes from its last checkpoint when one exists in storage (`identity`), and a
    finished run returns its adapter without training unless `force`."""

    from ray_jobs.core.modeling import is_built_base, load_tokenizer, resolve_model_dir
    from ray_jobs.runlogs import copy_run_logs

    ds_config = preflight(recipe)
    storage = Storage.from_uri(recipe.storage.root)
    packed_rows = dataset.stats["packing"]["rows"]
    per_epoch = steps_per_epoch(packed_rows, recipe)
    if per_epoch == 0:
        t = recipe.train
        raise TrainError(
            f"data: {packed_rows} training rows are too few for one optimizer step with "
            f"train.workers={t.workers} x micro_batch_size={t.micro_batch_size} x grad_accum={t.grad_accum}"
        )
    total_steps = recipe.train.max_steps or per_epoch * recipe.train.epochs
    model_dir = resolve_model_dir(recipe.model, storage)
    tokenizer = load_tokenizer(
        model_dir, recipe.model.revision, recipe.model.trust_remote_code, recipe.model.chat_template
    )

    run_name, record, existed = claim_run(storage, recipe, dataset, run_name, force=force)
    if record.adapter:
        return _already_finished(recipe, run_name, record.adapter)
    has_eval = bool(dataset.stats["rows_out"].get("eval"))
    datasets = _ray_datasets(dataset, storage, has_eval)
    scratch = Path(tempfile.mkdtemp(prefix="medtune-train-"))
    parent = parent_adapter(recipe, storage)
    plan = WorkerPlan(
        recipe=recipe,
        init_adapter=parent,
        model_dir=model_dir,
        total_steps=total_steps,
        pad_id=tokenizer.pad_token_id,
        has_eval=has_eval,
        run_name=run_name,
        deepspeed_config=ds_config,
        tensorboard=TensorboardFolder(
            local_dir=str(scratch / "tensorboard"),
            storage_root=recipe.storage.root,
            storage_rel=posixpath.join(run_prefix(run_name), "tensorboard"),
        ),
        fault_at_step=fault_at_step,
        fault_marker=str(scratch / "fault-injected"),
    )
    trainer = torch_trainer(plan, datasets, storage)
    print(
        f"[medtune] {'resuming' if existed else 'training'} {recipe.name}: {recipe.train.workers} worker(s), "
        f"{total_steps} steps, {packed_rows} packed rows, run {storage.uri(run_prefix(run_name))}",
        flush=True,
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; keep the cause, drop the trace
        raise TrainError(f"training failed after {recipe.train.max_failures} restart(s): {exc}") from exc
    finally:
        # A RayJob's cluster (and its logs) is deleted when the job ends: keep the logs in storage.
        copy_run_logs(storage, run_name)
    best = _best_checkpoint(result, has_eval)
    if best is None:
        raise TrainError("training finished without a checkpoint; see the Ray logs of the run")
    checkpoint, metrics = best
    # Versions name the time of publishing: "latest" is the last one by name.
    version = time.strftime("%Y%m%d-%H%M%S")
    lineage = Lineage(
        kind="trained",
        name=recipe.name,
        version=version,
        run=storage.uri(run_prefix(run_name)),
        base_model=recipe.model.base,
        resolved_base_model=model_dir if is_built_base(recipe.model.base) else recipe.model.base,
        dataset=dataset.uri,
        dataset_fingerprint=dataset.fingerprint,
        recipe_hash=recipe.recipe_hash(),
        method=recipe.train.method,
        quantization=recipe.model.quantization,
        parent={"adapter": parent[0], "version": parent[1]} if parent else None,
        metrics=_numbers(metrics),
        final_metrics=_numbers(result.metrics or {}),
    )
    uri = publish_adapter(storage, checkpoint, recipe, version, tokenizer, lineage)
    finish_run(storage, record, {"name": recipe.name, "version": version, "uri": uri, "metrics": lineage.metrics})
    print(f"[medtune] adapter published: {uri}", flush=True)
    return TrainResult(run_name, recipe.name, version, uri, lineage.metrics)


def _already_finished(recipe: Recipe, run_name: str, adapter: dict[str, Any]) -> TrainResult:
    print(
        f"[medtune] run {run_name} already finished: adapter {recipe.name}@{adapter['version']} at "
        f"{adapter['uri']} (medtune train --force trains again under a new run name)",
        flush=True,
    )
    return TrainResult(run_name, recipe.name, adapter["version"], adapter["uri"], adapter["metrics"])


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _ray_datasets(dataset: DatasetRef, storage: Storage, has_eval: bool) -> dict[str, Any]:
    import ray.data

    datasets = {"train": ray.data.read_parquet(storage.path(dataset.train_path), filesystem=storage.filesystem)}
    if has_eval:
        # Read once into the object store (Ray spills it if large): the workers go over the eval
        # split at every checkpoint, and re-reading the parquet files each time launched a
        # list-and-read task round of several seconds per evaluation (about a third of the
        # quickstart's training stage on 2 CPUs).
        datasets["eval"] = ray.data.read_parquet(
            storage.path(dataset.eval_path), filesystem=storage.filesystem, columns=["input_ids", "labels"]
        ).materialize()
    return datasets


def torch_trainer(plan: WorkerPlan, datasets: dict[str, Any], storage: Storage):
    """Ray Train's TorchTrainer for `plan`: its workers, data shards, checkpoints and restarts."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    recipe = plan.recipe
    # The trackers a recipe configures read their credentials and settings from the environment
    # (MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, ...): hand the driver's to the workers.
    tracking = recipe.train.tracking
    prefixes = ("MLFLOW_",) * bool(tracking.mlflow_uri) + ("WANDB_",) * bool(tracking.wandb_project)
    worker_env = {key: value for key, value in os.environ.items() if prefixes and key.startswith(prefixes)}
    use_gpu = recipe.train.gpus_per_worker > 0
    resources = {"CPU": recipe.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = recipe.train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker=_train_loop,
        # Ray Train wants a dict here; the plan travels as its one value.
        train_loop_config={PLAN_KEY: plan},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=recipe.train.dist_timeout_s),
        scaling_config=ScalingConfig(num_workers=recipe.train.workers, use_gpu=use_gpu, resources_per_worker=resources),
        datasets=datasets,
        # Ordered, equal shards: a resumed worker skips exactly the rows it already trained on.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=storage.path("runs"),
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=recipe.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=recipe.train.keep_checkpoints,
                checkpoint_score_attribute="eval_loss" if plan.has_eval else "step",
                checkpoint_score_order="min" if plan.has_eval else "max",
            ),
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
        ),
    )


def _train_loop(config: dict[str, Any]) -> None:
    # Imported in the worker: the driver need not load the training stack.
    from ray_jobs.train.loop import train_loop_per_worker

    train_loop_per_worker(config)


def _best_checkpoint(result, has_eval: bool):
    candidates = list(result.best_checkpoints or [])
    if not candidates:
        return (result.checkpoint, result.metrics or {}) if result.checkpoint else None
    if has_eval:
        scored = [c for c in candidates if "eval_loss" in c[1]]
        if scored:
            return min(scored, key=lambda c: c[1]["eval_loss"])
    return max(candidates, key=lambda c: c[1].get("step", 0))


def publish_adapter(storage: Storage, checkpoint, recipe: Recipe, version: str, tokenizer, lineage: Lineage) -> str:
    """Copy the checkpoint's adapter + tokenizer + lineage to adapters/<name>/<version>/."""
    from ray_jobs.train.checkpointing import ADAPTER_DIR

    with tempfile.TemporaryDirectory() as tmp, checkpoint.as_directory() as ckpt_dir:
        out = Path(tmp) / "adapter"
        source = Path(ckpt_dir) / ADAPTER_DIR
        if not source.is_dir():
            raise TrainError(f"checkpoint {checkpoint.path} has no {ADAPTER_DIR}/ directory")
        import shutil

        shutil.copytree(source, out)
        tokenizer.save_pretrained(out)
        stamp_artifact(out, lineage)
        return storage.upload_dir(out, adapter_prefix(recipe.name, version), info={"base_model": recipe.model.base})


def main(recipe: Recipe, dataset: DatasetRef) -> TrainResult:
    return run(recipe, dataset)

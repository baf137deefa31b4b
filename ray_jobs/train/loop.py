"""The function Ray Train runs on every training worker.

Everything a worker needs arrives in the driver's `WorkerPlan` (the validated recipe, the
resolved model directory, the DeepSpeed profile, step counts): no module-level state is
read inside a worker, so the same function runs on a laptop, a GPU node or a KubeRay pod.
The work itself is `ray_jobs.train.trainer.Trainer`'s.

The names below stay importable from here for code outside the training stage (tests,
benchmarks) that builds a model or writes an adapter the way a worker does.
"""

from __future__ import annotations

from typing import Any

from ray_jobs.train.checkpointing import ADAPTER_DIR, STATE_FILE, Position, export_adapter, load_trainable
from ray_jobs.train.model_setup import (
    LORA_TARGETS,
    autocast,
    build_model,
    checkpoint_plan,
    enable_checkpointing,
    layers_to_checkpoint,
    optimizer_bytes_per_param,
)
from ray_jobs.train.plan import PLAN_KEY, WorkerPlan
from ray_jobs.train.tracking import METRICS_FILE
from ray_jobs.train.trainer import FAULT_ENV, Trainer, WorkerContext, fault_hooks

__all__ = [
    "ADAPTER_DIR",
    "FAULT_ENV",
    "LORA_TARGETS",
    "METRICS_FILE",
    "STATE_FILE",
    "Position",
    "autocast",
    "build_model",
    "checkpoint_plan",
    "enable_checkpointing",
    "export_adapter",
    "layers_to_checkpoint",
    "load_trainable",
    "optimizer_bytes_per_param",
    "train_loop_per_worker",
]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    plan: WorkerPlan = config[PLAN_KEY]
    trainer = Trainer(plan, WorkerContext.from_ray(plan), after_step=fault_hooks(plan))
    trainer.setup()
    trainer.restore(ray.train.get_checkpoint())
    eval_shard = ray.train.get_dataset_shard("eval") if plan.has_eval else None
    trainer.fit(ray.train.get_dataset_shard("train"), eval_shard)

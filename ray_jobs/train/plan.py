"""What the driver hands every training worker: the validated recipe and what it resolved.

The plan is made once on the driver (`ray_jobs.train.run`) and pickled to the workers, so
no worker reads module-level state or re-derives anything: the same plan trains on a
laptop, a GPU node or a KubeRay pod. It holds the `Recipe` itself, typed, and imports
nothing heavy, as the driver may have no GPU stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray_jobs.core.recipe import Recipe
from ray_jobs.train.tracking import TensorboardFolder

PLAN_KEY = "plan"
"""The one key of Ray Train's `train_loop_config` dict, whose value is the WorkerPlan."""


@dataclass(frozen=True)
class WorkerPlan:
    recipe: Recipe
    model_dir: str
    """The base model's local directory (or hub id), resolved by the driver."""
    total_steps: int
    """Optimizer steps of the whole run: train.max_steps, or steps per epoch x epochs."""
    pad_id: int
    """The tokenizer's padding id, which collation pads with and the token counts skip."""
    has_eval: bool
    """Whether the run has an eval split (a dataset shard named "eval")."""
    run_name: str | None = None
    """The run's name: its storage folder and its MLflow / W&B run name."""
    deepspeed_config: dict[str, Any] | None = None
    """The DeepSpeed profile as loaded from its JSON file; None trains with DDP (or alone)."""
    tensorboard: TensorboardFolder | None = None
    """Where rank 0 writes TensorBoard events and metrics.jsonl; None writes neither."""
    init_adapter: tuple[str, str] | None = None
    """(name, version) of the published adapter that lora.init_from continues, resolved by the driver."""
    fault_at_step: int | None = None
    """Test hook: rank 0 exits hard once at this optimizer step, to exercise resume."""
    fault_marker: str | None = None
    """A file that records the fault was injected, so the restarted worker does not fail again."""

    @property
    def zero3(self) -> bool:
        """ZeRO-3 shards the weights themselves: loading and saving must know."""
        ds = self.deepspeed_config
        return bool(ds and ds.get("zero_optimization", {}).get("stage") == 3)

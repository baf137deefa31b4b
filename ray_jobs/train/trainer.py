"""One training worker's work, phase by phase: setup, restore, step, evaluate, save, fit.

`ray_jobs.train.loop.train_loop_per_worker` builds a `Trainer` from the driver's
`WorkerPlan` and calls `fit`; benchmarks build one outside Ray Train and call `setup` and
`step` alone, so they time the very step that ships.

Design decisions:
- Loss is the token-weighted mean over target tokens of a whole optimizer step (summed
  cross-entropy / target-token count), so packing and padding never reweight documents.
- Packed rows go to the model with `position_ids` restarting per document and no
  attention mask: transformers then builds a block-diagonal (document) mask.
- `import deepspeed` happens only inside the worker when the recipe asks for it: importing
  it on a CPU-only driver can fail.
- What only tests need (a crash at a given step) is an `after_step` hook, installed by the
  worker function when asked for, never a branch of the step itself.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.core.modeling import collate, summed_loss, target_token_count
from ray_jobs.train.checkpointing import Position, restore_checkpoint, save_checkpoint, set_rng_state
from ray_jobs.train.model_setup import (
    autocast,
    checkpoint_plan,
    enable_checkpointing,
    load_training_model,
    optimizer_bytes_per_param,
    uses_liger,
)
from ray_jobs.train.plan import WorkerPlan
from ray_jobs.train.tracking import MetricsLog, resume_metrics

SHUFFLE_BUFFER_ROWS = 256
"""Packed rows held for the per-epoch local shuffle (a few MB even at 4k-token rows)."""
FAULT_ENV = "MEDTUNE_FAIL_AT_STEP"
"""Test hook: a worker exits hard at this optimizer step once, to exercise resume."""


@dataclass(frozen=True)
class WorkerContext:
    """Where this worker runs among the run's workers."""

    rank: int
    world: int
    device: Any
    """A torch.device: this worker's GPU, or the CPU."""

    @classmethod
    def from_ray(cls, plan: WorkerPlan) -> WorkerContext:
        import ray.train
        import ray.train.torch
        import torch

        context = ray.train.get_context()
        use_gpu = plan.recipe.train.gpus_per_worker > 0
        device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        if not use_gpu and plan.recipe.train.cpu_threads:
            torch.set_num_threads(plan.recipe.train.cpu_threads)
        return cls(rank=context.get_world_rank(), world=context.get_world_size(), device=device)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step went through on this worker.

    The loss and gradient norm stay device tensors until read: reading one waits for the GPU
    to finish the step, and a step that waited for every such value left the GPU idle while
    the host queued the next micro-batch's kernels."""

    target_tokens: int
    real_tokens: int
    """Non-pad tokens the step read."""
    loss_sum_tensor: Any
    """Summed cross-entropy over the step's target tokens (a 0-d tensor)."""
    grad_norm_tensor: Any | None
    """Before clipping (a 0-d tensor); None under DeepSpeed, which clips inside its engine."""

    @property
    def loss_sum(self) -> float:
        return float(self.loss_sum_tensor)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.target_tokens, 1)

    @property
    def grad_norm(self) -> float | None:
        return None if self.grad_norm_tensor is None else float(self.grad_norm_tensor)


AfterStep = Callable[["Trainer"], None]
"""Called after every optimizer step, with `trainer.position.step` already counting it."""


class CrashOnceAtStep:
    """Rank 0 exits hard after optimizer step `step`, as a killed pod or OOM would, once per
    `marker` file: the restarted worker finds the marker and trains on."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def __call__(self, trainer: Trainer) -> None:
        if trainer.position.step != self.step or trainer.worker.rank != 0 or self.marker.exists():
            return
        self.marker.write_text("failed once")
        os._exit(1)


def fault_hooks(plan: WorkerPlan) -> list[AfterStep]:
    """The crash the plan or the worker's MEDTUNE_FAIL_AT_STEP asks for, if any."""
    step = plan.fault_at_step or int(os.environ.get(FAULT_ENV, "0"))
    if not step or not plan.fault_marker:
        return []
    return [CrashOnceAtStep(step, Path(plan.fault_marker))]


def upload_checkpoint(checkpoint, checkpoint_dir_name: str):
    """Ray Train's checkpoint upload, through medtune's verified `copy_tree`.

    Ray's own upload is `pyarrow.fs.copy_files`, which drops the error of an S3 upload that
    fails (shown in tests/test_storage_faults.py), so a server error mid-checkpoint could leave
    a checkpoint Ray registers as saved without its weights. This raises instead, so the step
    fails and Ray Train restarts the worker from the last whole checkpoint
    (tests/test_train_storage_faults.py)."""
    import ray.train
    from ray.train import Checkpoint

    from ray_jobs.core.storage import copy_tree

    storage = ray.train.get_context().get_storage()
    destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    copy_tree(checkpoint.path, storage.storage_filesystem, destination)
    return Checkpoint(destination, storage.storage_filesystem)


class Trainer:
    """A worker's model, optimizer and position in the data, and the phases that move them."""

    def __init__(self, plan: WorkerPlan, worker: WorkerContext, *, after_step: Sequence[AfterStep] = ()):
        import torch

        self.plan, self.worker = plan, worker
        self.train_cfg = plan.recipe.train
        self.after_step = list(after_step)
        self.position = Position()
        self.best_eval, self.stale_evals = math.inf, 0
        self.resumed_from: int | None = None  # reported, so a restart is visible in the run's metrics
        self.model = self.forward_model = self.engine = self.optimizer = self.scheduler = None
        self.params: list = []
        self.fused = False
        self.checkpointed_layers = 0
        # Per log window, summed over ranks at each log: loss sum, target tokens, real tokens.
        # The counts are known on the host; the loss sum stays on the device until the log.
        self.window = torch.zeros(3, dtype=torch.float64)
        self.window_loss: Any = 0.0
        self.window_started = time.perf_counter()
        self.eval_shard = None
        self.log: MetricsLog | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Seed, load the model, choose its activation checkpointing, and wrap it with the
        optimizer, scheduler and DeepSpeed or DDP as the plan asks."""
        import torch
        from transformers import get_scheduler

        train, device = self.train_cfg, self.worker.device
        random.seed(train.seed), np.random.seed(train.seed), torch.manual_seed(train.seed)
        recipe = self.plan.recipe
        self.model = load_training_model(
            recipe.model,
            recipe.lora,
            train,
            self.plan.model_dir,
            device,
            zero3=self.plan.zero3,
            init_adapter_dir=self._parent_adapter_dir(),
        )
        self.fused = uses_liger(train, device)
        self.checkpointed_layers = self._choose_checkpointing()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay)
        self.scheduler = get_scheduler(
            train.scheduler,
            self.optimizer,
            num_warmup_steps=train.warmup_steps,
            num_training_steps=self.plan.total_steps,
        )
        self._wrap_for_distribution()
        self.forward_model.train()

    def autocast_ctx(self):
        # DeepSpeed casts the model to its bf16/fp16 setting itself; DDP and one GPU autocast.
        if self.plan.deepspeed_config:
            return contextlib.nullcontext()
        return autocast(self.plan.recipe.model, self.worker.device)

    def _parent_adapter_dir(self) -> str | None:
        """The lora.init_from adapter, downloaded from storage to this worker (once per node)."""
        if self.plan.init_adapter is None:
            return None
        from ray_jobs.core.storage import Storage, adapter_prefix

        name, version = self.plan.init_adapter
        scratch = Path(tempfile.gettempdir()) / "medtune-parents" / f"{name}@{version}-rank{self.worker.rank}"
        storage = Storage.from_uri(self.plan.recipe.storage.root)
        return str(storage.download_dir(adapter_prefix(name, version), scratch, require_complete=True))

    def _choose_checkpointing(self) -> int:
        """Turn on `gradient_checkpointing: auto`'s share of layers; returns how many recompute."""
        setting = self.train_cfg.gradient_checkpointing
        if setting is False:
            return 0
        if setting is True:  # load_training_model turned it on for every layer
            return getattr(self.model.config, "num_hidden_layers", 0)
        layers = self._layers_to_checkpoint()
        quantized = self.plan.recipe.model.quantization != "none"
        chosen = enable_checkpointing(self.model, quantized, layers) if layers != 0 else 0
        if self.worker.rank == 0:
            print(
                f"[medtune] gradient checkpointing (auto): {chosen} of {self.model.config.num_hidden_layers} layers",
                flush=True,
            )
        return chosen

    def _layers_to_checkpoint(self) -> int | None:
        """`checkpoint_plan`'s answer (None: all layers), the same on every rank."""
        import torch
        import torch.distributed as dist

        recipe, train, device = self.plan.recipe, self.train_cfg, self.worker.device
        if self.plan.zero3:
            return None  # ZeRO-3 places the weights inside deepspeed.initialize: nothing to probe yet
        if recipe.model.quantization == "8bit" and device.type == "cuda":
            # LLM.int8 allocates more after its first steps than the probe step shows: on an
            # H100 (8B shape, 4,096-token rows) the probe said off and the first real step ran
            # out of memory at 78 GiB (benchmarks/results/train_resume-8bit-ddp-h100-oom.txt).
            return None
        layers = checkpoint_plan(
            self.model,
            micro_batch=train.micro_batch_size,
            seq_len=recipe.data.max_seq_len,
            device=device,
            fused=self.fused,
            full_finetune=train.method == "full",
            budget_gib=train.max_gpu_memory_gib,
            state_bytes_per_param=optimizer_bytes_per_param(
                deepspeed=bool(self.plan.deepspeed_config), workers=self.worker.world
            ),
            # Before DeepSpeed casts the model, the probe autocasts as DDP would.
            autocast_ctx=lambda: autocast(recipe.model, device),
        )
        if self.worker.world > 1:  # every rank must make the same choice: the most checkpointing any needs
            count = torch.tensor([float("inf") if layers is None else float(layers)], device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            layers = None if math.isinf(count.item()) else int(count.item())
        return layers

    def _wrap_for_distribution(self) -> None:
        import torch

        ds_config, train, device = self.plan.deepspeed_config, self.train_cfg, self.worker.device
        if ds_config:
            import deepspeed

            if device.type == "cpu":
                skip_shm_collectives()
            dtype = next(p.dtype for p in self.model.parameters())
            ds_config = {
                **ds_config,
                "bf16": {"enabled": dtype == torch.bfloat16},
                "fp16": {"enabled": dtype == torch.float16},
                "train_micro_batch_size_per_gpu": train.micro_batch_size,
                "gradient_accumulation_steps": train.grad_accum,
                "gradient_clipping": train.max_grad_norm,
            }
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config
            )
            self.forward_model = self.engine
        elif self.worker.world > 1:
            import ray.train.torch

            self.forward_model = ray.train.torch.prepare_model(self.model, move_to_device=False)
        else:
            self.forward_model = self.model

    # ------------------------------------------------------------------ restore
    def restore(self, checkpoint) -> None:
        """Continue from a Ray Train checkpoint (None: start afresh): weights, optimizer,
        scheduler, RNG states, early-stopping state and the position in the data."""
        if not checkpoint:
            return
        with checkpoint.as_directory() as directory:
            state = restore_checkpoint(Path(directory), self.model, self.engine, self.optimizer, self.scheduler)
            self.position = Position(**state["position"])
            self.best_eval, self.stale_evals = state["best_eval"], state["stale_evals"]
            set_rng_state(state["rng"])
        self.resumed_from = self.position.step
        if self.worker.rank == 0:
            position = self.position
            print(
                f"[medtune] resumed from step {position.step} (epoch {position.epoch}, "
                f"micro-batch {position.micro_batches})",
                flush=True,
            )
            if self.plan.tensorboard is not None:
                resume_metrics(self.plan.tensorboard, position.step)

    # ------------------------------------------------------------------ step
    def accumulate(self, rows: dict[str, Any]) -> tuple[Any, int, int]:
        """Forward and backward one micro-batch; its gradients wait for the next update.
        Returns its (loss sum as a detached device tensor, target tokens, real tokens)."""
        pad_id = self.plan.pad_id
        host = collate(rows, pad_id)
        count, real = target_token_count(host[1]), int((host[0] != pad_id).sum())
        device = self.worker.device
        if device.type == "cuda":
            # A blocking copy waits for the GPU to finish everything queued before it; from pinned
            # memory a non-blocking one is queued behind the running kernels instead.
            ids, labels, pos = (t.pin_memory().to(device, non_blocking=True) for t in host)
        else:
            ids, labels, pos = (t.to(device) for t in host)
        with self.autocast_ctx():
            loss_sum, _ = summed_loss(self.forward_model, ids, labels, pos, fused=self.fused, target_tokens=count)
        # Normalise by this worker's target tokens in the step so far; exact per step
        # on one worker, and the DDP mean across workers keeps the scale right.
        scaled = loss_sum / max(count, 1) / self.train_cfg.grad_accum
        if self.engine is not None:
            self.engine.backward(scaled)
            self.engine.step()  # an optimizer step only at DeepSpeed's accumulation boundary
        else:
            scaled.backward()
        loss_sum = loss_sum.detach().double()
        self.window_loss = self.window_loss + loss_sum
        self.window[1] += count
        self.window[2] += real
        self.position.micro_batches += 1
        return loss_sum, count, real

    def step(self, micro_batches: Iterable[dict[str, Any]]) -> StepResult:
        """One optimizer step over `micro_batches` (train.grad_accum of them in a run)."""
        import torch

        loss_sum, target, real = 0.0, 0, 0
        for rows in micro_batches:
            micro_loss, micro_target, micro_real = self.accumulate(rows)
            loss_sum, target, real = loss_sum + micro_loss, target + micro_target, real + micro_real
        grad_norm = None
        if self.engine is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train_cfg.max_grad_norm).detach()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.position.step += 1
        for hook in self.after_step:
            hook(self)
        return StepResult(target, real, loss_sum, grad_norm)

    # ------------------------------------------------------------------ evaluate
    def evaluate(self) -> float | None:
        """Token-weighted eval loss over every worker's eval shard; None without one."""
        import torch

        if self.eval_shard is None:
            return None
        self.forward_model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        batches = self.eval_shard.iter_batches(batch_size=self.train_cfg.micro_batch_size, batch_format="numpy")
        with torch.no_grad():
            for rows in batches:
                ids, labels, pos = (t.to(self.worker.device) for t in collate(rows, self.plan.pad_id))
                with self.autocast_ctx():
                    loss_sum, count = summed_loss(self.forward_model, ids, labels, pos, fused=False)
                totals += torch.tensor([float(loss_sum), count], dtype=torch.float64)
        if self.worker.world > 1:
            totals = summed_over_workers(totals, self.worker.device)
        self.forward_model.train()
        return float(totals[0] / max(totals[1], 1))

    # ------------------------------------------------------------------ save
    def save(self, metrics: dict[str, Any]) -> None:
        """Write a checkpoint and report it to Ray Train with `metrics`."""
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(
                Path(tmp),
                self.model,
                self.engine,
                self.optimizer,
                self.scheduler,
                self.position,
                self.best_eval,
                self.stale_evals,
                self.worker.rank,
            )
            written = any(Path(tmp).iterdir())
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(tmp) if written else None,
                checkpoint_upload_fn=upload_checkpoint if written else None,
            )
        if self.log is not None:
            self.log.sync()

    # ------------------------------------------------------------------ fit
    def fit(self, train_shard, eval_shard=None) -> None:
        """Train to the plan's total steps (or early stop), logging, evaluating and
        checkpointing on the recipe's schedule."""
        plan, train = self.plan, self.train_cfg
        self.eval_shard = eval_shard
        self.log = MetricsLog(
            plan.recipe,
            run_name=plan.run_name,
            folder=plan.tensorboard,
            rank=self.worker.rank,
            total_steps=plan.total_steps,
            resumed_from=self.resumed_from,
        )
        self.forward_model.train()
        self._clear_window()
        self.window_started = time.perf_counter()
        done = self.position.step >= plan.total_steps
        # With max_steps the data is cycled as often as needed; otherwise `epochs` passes.
        max_epochs = train.epochs if train.max_steps is None else 10**9
        while not done and self.position.epoch < max_epochs:
            group: list[dict[str, Any]] = []
            for rows in self._epoch_batches(train_shard):
                group.append(rows)
                if len(group) < train.grad_accum:
                    continue
                result, group = self.step(group), []
                if self._after_update(result):
                    done = True
                    break
            else:
                # An epoch's last micro-batches short of a whole step: their gradients carry
                # into the next epoch's first step, as DeepSpeed's own accumulation does.
                for rows in group:
                    self.accumulate(rows)
                self.position.epoch += 1
                self.position.micro_batches = 0
                done = self.position.epoch >= max_epochs
        self.log.close()

    def _epoch_batches(self, train_shard) -> Iterable[dict[str, Any]]:
        """This epoch's micro-batches, less those consumed before a restart."""
        micro_batch = self.train_cfg.micro_batch_size
        # Rows are written block by block, and neighbouring rows can hold the same kind of
        # example (with length-sorted packing, read in order, a tiny model's held-out entity
        # F1 was 0.17, shuffled 0.44; see pack_documents). A seeded local shuffle per epoch
        # mixes them and stays deterministic, so a resumed worker still skips exactly the
        # rows it trained on.
        batches = train_shard.iter_batches(
            batch_size=micro_batch,
            batch_format="numpy",
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_ROWS, micro_batch),
            local_shuffle_seed=self.train_cfg.seed + self.position.epoch,
        )
        return itertools.islice(batches, self.position.micro_batches, None)

    def _after_update(self, result: StepResult) -> bool:
        """Log, evaluate and checkpoint when the schedule says so; True when training ends."""
        import ray.train

        train, step = self.train_cfg, self.position.step
        is_last = step >= self.plan.total_steps
        at_checkpoint = step % train.checkpoint_every == 0 or is_last
        at_eval = at_checkpoint or (train.eval_every and step % train.eval_every == 0)
        at_log = step % train.log_every == 0 or at_checkpoint
        if not (at_log or at_eval):
            return False
        metrics = self._window_metrics(result)
        if at_eval:
            self._record_eval(metrics)
        patience = train.early_stopping_patience
        stop_early = bool(patience and self.stale_evals >= patience)
        metrics["final"] = is_last or stop_early
        self.log.write(metrics, step)
        if at_checkpoint or stop_early:
            self.save(metrics)
        else:
            ray.train.report(metrics)
        self.window_started = time.perf_counter()  # eval and checkpoint time is not training time
        return is_last or stop_early

    def _window_metrics(self, result: StepResult) -> dict[str, Any]:
        """The log window's metrics over all workers; starts the next window."""
        import torch

        window = self.window
        window[0] = float(self.window_loss)  # the one wait for the GPU per log window
        if self.worker.world > 1:
            window = summed_over_workers(window, self.worker.device)
        metrics: dict[str, Any] = {
            "step": self.position.step,
            "epoch": self.position.epoch,
            "loss": float(window[0] / max(window[1], 1)),
            "lr": float(self.scheduler.get_last_lr()[0]),
            # Real (non-pad) tokens per second over all workers since the last log.
            "tokens_per_s": float(window[2]) / max(time.perf_counter() - self.window_started, 1e-9),
        }
        if result.grad_norm is not None:
            metrics["grad_norm"] = result.grad_norm
        if self.resumed_from is not None:
            metrics["resumed_from_step"] = self.resumed_from
        if self.worker.device.type == "cuda":
            metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.worker.device) / 2**30
        self._clear_window()
        return metrics

    def _clear_window(self) -> None:
        self.window.zero_()
        self.window_loss = 0.0

    def _record_eval(self, metrics: dict[str, Any]) -> None:
        eval_loss = self.evaluate()
        if eval_loss is None:
            return
        metrics["eval_loss"] = eval_loss
        metrics["eval_perplexity"] = math.exp(min(eval_loss, 50))
        if eval_loss < self.best_eval - 1e-6:
            self.best_eval, self.stale_evals = eval_loss, 0
        else:
            self.stale_evals += 1


def summed_over_workers(values, device):
    """All-reduce (sum) a small CPU tensor through the process group's own device: NCCL has
    no CPU tensors (the GPU error reads "No backend type associated with device type cpu")."""
    import torch.distributed as dist

    on_device = values.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def skip_shm_collectives() -> None:
    """Keep DeepSpeed on CPU from JIT-compiling its shared-memory all-reduce op.

    DeepSpeed's CPU backend builds `deepspeed_shm_comm` with ninja/g++ the first time a
    process starts its communication backend on a machine: 45-95 s of C++ on 2 cores, paid
    again on every fresh machine (CI) and whenever the torch-extensions cache misses. The
    op only speeds up large CPU all-reduces; without it DeepSpeed sends the same reductions
    through the gloo process group Ray Train already set up. GPUs use NCCL and never build it.
    """
    import deepspeed.ops

    # deepspeed.ops caches this dict at first access, and build_shm_op reads it from there.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

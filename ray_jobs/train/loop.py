"""The per-worker training loop that Ray Train runs on every worker.

Everything the loop needs arrives in `config` (the recipe as a dict, the resolved model
directory, the DeepSpeed profile as a dict, step counts): no module-level state is read
inside a worker, so the same function runs on a laptop, a GPU node or a KubeRay pod.

Design decisions:
- Loss is the token-weighted mean over target tokens of a whole optimizer step (summed
  cross-entropy / target-token count), so packing and padding never reweight documents.
- Packed rows go to the model with `position_ids` restarting per document and no
  attention mask: transformers then builds a block-diagonal (document) mask.
- A checkpoint holds the trainable weights (the LoRA adapter in PEFT format, or the full
  model), optimizer, scheduler, RNG states and the data position (epoch, micro-batches
  consumed). On restart the loop skips exactly the consumed micro-batches of that epoch,
  so a resumed run continues the same data order.
- `import deepspeed` happens only inside the worker when the recipe asks for it: importing
  it on a CPU-only driver can fail.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.core.modeling import collate, summed_loss

LORA_TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"
SHUFFLE_BUFFER_ROWS = 256
"""Packed rows held for the per-epoch local shuffle (a few MB even at 4k-token rows)."""
METRICS_FILE = "metrics.jsonl"
"""Every logged step's metrics, one JSON object per line, in the run's tensorboard/ folder."""
FAULT_ENV = "MEDTUNE_FAIL_AT_STEP"
"""Test hook: a worker exits hard at this optimizer step once, to exercise resume."""


def lora_targets(targets: str | list[str]) -> str | list[str]:
    if isinstance(targets, list):
        return targets
    if targets == "all-linear":
        return "all-linear"
    return list(LORA_TARGETS[targets])


def build_model(cfg: dict[str, Any], device, zero3: bool):
    """Load the base (quantised as asked), wrap it with LoRA unless full fine-tuning."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from ray_jobs.core import attention
    from ray_jobs.core.modeling import load_model
    from ray_jobs.core.recipe import ModelConfig

    recipe = cfg["recipe"]
    model_cfg = ModelConfig.model_validate(recipe["model"])
    train = recipe["train"]
    # The config alone (no weights) says whether the model's attention is one varlen computes.
    config = AutoConfig.from_pretrained(
        cfg["model_dir"], revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    attn = attention.training_attention(model_cfg.attn_implementation, device, config)
    if attn == attention.NAME:
        attention.register()
    model = load_model(model_cfg, cfg["model_dir"], device=device, zero3=zero3, attn_implementation=attn)
    model.config.use_cache = False
    if uses_liger(train, device):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # Before PEFT wraps the modules; the patched forward computes the loss itself.
        _apply_liger_kernel_to_instance(
            model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
    if model_cfg.quantization != "none":
        # What PEFT's prepare_model_for_kbit_training does, less its cast of every
        # non-quantised weight (embeddings, lm_head, norms) to fp32: those stay frozen, and
        # in fp32 they carry the whole residual stream in fp32 (twice the activation memory,
        # slower elementwise kernels) for no benefit to the LoRA weights.
        for param in model.parameters():
            param.requires_grad = False
    if train["method"] == "lora":
        lora = recipe["lora"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"],
                bias=lora["bias"],
                target_modules=lora_targets(lora["targets"]),
                modules_to_save=lora["modules_to_save"] or None,
                use_rslora=lora["use_rslora"],
                use_dora=lora["use_dora"],
                task_type="CAUSAL_LM",
            ),
        )
        trainable_in_fp32(model)
    # `auto` starts without; train_loop_per_worker turns it on after a probe step if needed.
    if train["gradient_checkpointing"] is True:
        enable_checkpointing(model, quantized=model_cfg.quantization != "none")
    if device is not None and torch.device(device).type == "cpu":
        model = model.float() if model_cfg.quantization == "none" else model
    return model


def trainable_in_fp32(model) -> None:
    """Cast the trainable parameters that PEFT left in the base's dtype to fp32.

    PEFT makes the LoRA weights fp32 (its `autocast_adapter_dtype`), but copies
    `modules_to_save` and leaves trained biases in the base's bf16/fp16:
    AdamW updates smaller than bf16's resolution then round away, and the fp32 cast of
    prepare_model_for_kbit_training, which used to cover them, is no longer applied. The
    frozen base keeps its dtype; autocast (GPU) or DeepSpeed's own cast meets the mix. (A
    trained copy of the embeddings puts out fp32, so the residual stream runs in fp32 then,
    as under any fp32-master mixed precision.)
    """
    import torch

    for param in model.parameters():
        # Plain parameters only: a bitsandbytes weight (a Parameter subclass) is packed storage.
        if param.requires_grad and param.dtype != torch.float32 and type(param) is torch.nn.Parameter:
            param.data = param.data.float()


def autocast(model_cfg: dict[str, Any], device):
    """bf16/fp16 autocast on GPU, as HF Trainer's `bf16=True` does.

    PEFT keeps LoRA weights in fp32; without autocast their fp32 outputs promote the residual stream and attention to fp32, which
    runs at a fraction of the bf16 tensor-core speed.
    """
    import contextlib

    import torch

    if device is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    name = (
        model_cfg["quant"]["compute_dtype"]
        if model_cfg.get("quantization", "none") == "4bit"
        else model_cfg.get("dtype", "auto")
    )
    dtype = {"fp16": torch.float16, "fp32": None}.get(name, torch.bfloat16)
    return torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()


def uses_liger(train: dict[str, Any], device) -> bool:
    import torch

    return bool(train.get("liger_kernels")) and device is not None and torch.device(device).type == "cuda"


def enable_checkpointing(model, quantized: bool, layers: int | None = None) -> int:
    """Turn gradient checkpointing on for `layers` decoder layers (all when None).

    The checkpointed layers are spread evenly over the depth. Reentrant checkpointing for
    quantised bases (non-reentrant clashes with QLoRA under ZeRO-3); it needs the
    embeddings' outputs to require grad, as the base stays frozen. Returns how many
    layers recompute their activations.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    options = {"use_reentrant": quantized}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = len(blocks) if layers is None else max(0, min(layers, len(blocks)))
    keep = {round(i * len(blocks) / chosen) for i in range(chosen)} if chosen else set()
    for index, block in enumerate(blocks):
        block.gradient_checkpointing = index in keep
    return chosen


LOSS_BYTES_PER_LOGIT = 16
"""What the unfused loss holds per [token x vocab] logit at its peak, an upper bound: the
logits, their fp32 copy, cross-entropy's fp32 log-probabilities and their gradient (12
bytes with bf16 logits, up to 16 with fp32 ones)."""


def layers_to_checkpoint(*, peak: float, static: float, layers: int, budget: float, logits: float = 0.0) -> int:
    """How many of `layers` decoder layers to checkpoint so a step's peak fits `budget`.

    A probe step without checkpointing peaked at `peak` bytes with `static` bytes (weights,
    optimizer states) resident before it, `logits` of it the unfused loss's logits and
    their buffers (0 when fused), which no checkpointing frees. The rest is the layers'
    activations, taken as spread evenly over them. Counting the logits there would
    over-estimate what each checkpointed layer frees and checkpoint too few, so they are
    left out; over-estimating `logits` only checkpoints more. A checkpointed layer keeps
    its input, so it frees a little less than its share: one layer more than the shares
    add up to covers that.
    """
    if peak <= budget:
        return 0
    per_layer = max(peak - static - logits, 1.0) / layers
    return min(layers, math.ceil((peak - budget) / per_layer) + 1)


def optimizer_bytes_per_param(*, deepspeed: bool, workers: int) -> float:
    """Bytes per trainable parameter one worker holds for AdamW once it has stepped.

    AdamW keeps two moments: 8 bytes in fp32 (4 with a bf16 model's bf16 moments; counting 8
    stays on the safe side). DeepSpeed ZeRO-1/2 adds an fp32 master copy of the weights (4
    bytes) and partitions all 12 over the workers.
    """
    return 12 / workers if deepspeed else 8


def checkpoint_plan(
    model,
    *,
    micro_batch: int,
    seq_len: int,
    device,
    fused: bool,
    full_finetune: bool,
    budget_gib: float | None = None,
    headroom: float = 0.85,
    autocast_ctx=contextlib.nullcontext,
    state_bytes_per_param: float = 8,
) -> int | None:
    """Decoder layers to checkpoint (0: none, None: all), from one probe step.

    The probe runs one full-size forward/backward without checkpointing (packed rows all
    have the same length, so one step is representative) and measures its peak. The step
    must fit `budget_gib` (the recipe's memory limit) or else `headroom` of the GPU.
    The optimizer's states do not exist yet: `state_bytes_per_param` (see
    `optimizer_bytes_per_param`) per trainable parameter are added.
    """
    import torch

    if torch.device(device).type != "cuda":
        return 0
    total = torch.cuda.get_device_properties(device).total_memory
    budget = min(budget_gib * 2**30, headroom * total) if budget_gib else headroom * total
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    states = state_bytes_per_param * sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = torch.cuda.memory_allocated(device) + states
    ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len), device=device)
    positions = torch.arange(seq_len, device=device).expand(micro_batch, -1)
    try:
        with autocast_ctx():
            loss, count = summed_loss(model, ids, ids, positions, fused=fused)
        (loss / max(count, 1)).backward()
        peak = torch.cuda.max_memory_allocated(device) + states
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        # The probe's peak is no training step's: the logged gpu_mem_gib starts afresh.
        torch.cuda.reset_peak_memory_stats(device)
    if full_finetune:
        return None if peak > budget else 0  # full fine-tuning: all or nothing
    layers = getattr(model.config, "num_hidden_layers", None) or model.get_base_model().config.num_hidden_layers
    logits = 0 if fused else micro_batch * seq_len * model.config.vocab_size * LOSS_BYTES_PER_LOGIT
    chosen = layers_to_checkpoint(peak=peak, static=static, layers=layers, budget=budget, logits=logits)
    return None if chosen >= layers else chosen


def trainable_state(model) -> dict[str, Any]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


class Position:
    """Where training stands: optimizer steps, epoch and micro-batches consumed in it."""

    def __init__(self, step: int = 0, epoch: int = 0, micro_batches: int = 0):
        self.step, self.epoch, self.micro_batches = step, epoch, micro_batches

    def as_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "micro_batches": self.micro_batches}


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from transformers import get_scheduler

    recipe, train = cfg["recipe"], cfg["recipe"]["train"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    use_gpu = train["gpus_per_worker"] > 0
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    ds_config = cfg.get("deepspeed_config")
    zero3 = bool(ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3)
    seed = train["seed"]
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    model = build_model(cfg, device, zero3)
    fused = uses_liger(train, device)
    # DeepSpeed casts the model to its bf16/fp16 setting itself; DDP and one GPU autocast.
    autocast_ctx = (lambda: autocast(recipe["model"], device)) if not ds_config else contextlib.nullcontext
    if train["gradient_checkpointing"] == "auto":
        quantized = recipe["model"]["quantization"] != "none"
        if zero3:
            layers = None  # ZeRO-3 places the weights inside deepspeed.initialize: nothing to probe yet
        elif recipe["model"]["quantization"] == "8bit" and device.type == "cuda":
            # LLM.int8 allocates more after its first steps than the probe step shows: on an
            # H100 (8B shape, 4,096-token rows) the probe said off and the first real step ran
            # out of memory at 78 GiB (benchmarks/results/train_resume-8bit-ddp-h100-oom.txt).
            layers = None
        else:
            layers = checkpoint_plan(
                model,
                micro_batch=train["micro_batch_size"],
                seq_len=recipe["data"]["max_seq_len"],
                device=device,
                fused=fused,
                full_finetune=train["method"] == "full",
                budget_gib=train["max_gpu_memory_gib"],
                state_bytes_per_param=optimizer_bytes_per_param(deepspeed=bool(ds_config), workers=world),
                # Before DeepSpeed casts the model, the probe autocasts as DDP would.
                autocast_ctx=lambda: autocast(recipe["model"], device),
            )
            if world > 1:  # every rank must make the same choice: the most checkpointing any needs
                count = torch.tensor([float("inf") if layers is None else float(layers)], device=device)
                dist.all_reduce(count, op=dist.ReduceOp.MAX)
                layers = None if math.isinf(count.item()) else int(count.item())
        chosen = enable_checkpointing(model, quantized, layers) if layers != 0 else 0
        if rank == 0:
            print(
                f"[medtune] gradient checkpointing (auto): {chosen} of {model.config.num_hidden_layers} layers",
                flush=True,
            )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])
    scheduler = get_scheduler(
        train["scheduler"], optimizer, num_warmup_steps=train["warmup_steps"], num_training_steps=cfg["total_steps"]
    )
    engine = None
    if ds_config:
        import deepspeed

        if device.type == "cpu":
            skip_shm_collectives()
        dtype = next(p.dtype for p in model.parameters())
        ds_config = {
            **ds_config,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "train_micro_batch_size_per_gpu": train["micro_batch_size"],
            "gradient_accumulation_steps": train["grad_accum"],
            "gradient_clipping": train["max_grad_norm"],
        }
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        forward_model = engine
    elif world > 1:
        forward_model = ray.train.torch.prepare_model(model, move_to_device=False)
    else:
        forward_model = model

    position = Position()
    best_eval, stale_evals = math.inf, 0
    resumed_from: int | None = None  # reported, so a restart is visible in the run's metrics
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)
            if engine is not None:
                engine.load_checkpoint(str(Path(ckpt_dir) / "deepspeed"), load_module_strict=False)
            else:
                missing = load_trainable(model, state["trainable"])
                assert not missing, f"checkpoint lacks trainable weights: {missing[:3]}"
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            position = Position(**state["position"])
            best_eval, stale_evals = state["best_eval"], state["stale_evals"]
            random.setstate(state["rng"]["python"]), np.random.set_state(state["rng"]["numpy"])
            torch.set_rng_state(state["rng"]["torch"])
        resumed_from = position.step
        if rank == 0:
            print(
                f"[medtune] resumed from step {position.step} (epoch {position.epoch}, "
                f"micro-batch {position.micro_batches})",
                flush=True,
            )
            if cfg.get("tensorboard_dir"):
                resume_metrics(cfg, position.step)

    pad_id = cfg["pad_id"]
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if cfg["has_eval"] else None
    total_steps, accum = cfg["total_steps"], train["grad_accum"]
    fail_at = int(os.environ.get(FAULT_ENV, "0"))
    writer = _tensorboard(cfg, rank, resumed_from)
    tracker = Tracker(cfg, rank)

    def evaluate() -> float | None:
        if eval_shard is None:
            return None
        forward_model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for rows in eval_shard.iter_batches(batch_size=train["micro_batch_size"], batch_format="numpy"):
                ids, labels, pos = (t.to(device) for t in collate(rows, pad_id))
                with autocast_ctx():
                    loss_sum, count = summed_loss(forward_model, ids, labels, pos, fused=False)
                totals += torch.tensor([float(loss_sum), count], dtype=torch.float64)
        if world > 1:
            totals = summed_over_workers(totals, device)
        forward_model.train()
        return float(totals[0] / max(totals[1], 1))

    def save_and_report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), model, engine, optimizer, scheduler, position, best_eval, stale_evals, rank)
            written = any(Path(tmp).iterdir())
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if written else None)
        if writer:
            writer.flush()
        if rank == 0:
            sync_tensorboard(cfg)

    forward_model.train()
    # Per log window, summed over ranks at each log: loss sum, target tokens, real tokens.
    window = torch.zeros(3, dtype=torch.float64)
    window_started = time.perf_counter()
    done = position.step >= total_steps
    # With max_steps the data is cycled as often as needed; otherwise `epochs` passes.
    max_epochs = train["epochs"] if train["max_steps"] is None else 10**9
    while not done and position.epoch < max_epochs:
        # Rows are written block by block, and neighbouring rows can hold the same kind of
        # example (with length-sorted packing, read in order, a tiny model's held-out entity
        # F1 was 0.17, shuffled 0.44; see pack_documents). A seeded local shuffle per epoch mixes them and stays
        # deterministic, so a resumed worker still skips exactly the rows it trained on.
        batches = train_shard.iter_batches(
            batch_size=train["micro_batch_size"],
            batch_format="numpy",
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_ROWS, train["micro_batch_size"]),
            local_shuffle_seed=seed + position.epoch,
        )
        skip = position.micro_batches
        micro_in_step = 0
        for index, rows in enumerate(batches):
            if index < skip:
                continue  # consumed before the restart
            ids, labels, pos = (t.to(device) for t in collate(rows, pad_id))
            with autocast_ctx():
                loss_sum, count = summed_loss(forward_model, ids, labels, pos, fused=fused)
            # Normalise by this worker's target tokens in the step so far; exact per step
            # on one worker, and the DDP mean across workers keeps the scale right.
            scaled = loss_sum / max(count, 1) / accum
            if engine is not None:
                engine.backward(scaled)
                engine.step()
            else:
                scaled.backward()
            window += torch.tensor([float(loss_sum), count, int((ids != pad_id).sum())], dtype=torch.float64)
            position.micro_batches = index + 1
            micro_in_step += 1
            if micro_in_step < accum:
                continue
            micro_in_step = 0
            grad_norm = None
            if engine is None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, train["max_grad_norm"]))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            position.step += 1
            if fail_at and position.step == fail_at and rank == 0:
                marker = Path(cfg["fault_marker"])
                if not marker.exists():
                    marker.write_text("failed once")
                    os._exit(1)  # a hard crash, as a killed pod or OOM would be
            is_last = position.step >= total_steps
            at_checkpoint = position.step % train["checkpoint_every"] == 0 or is_last
            at_eval = at_checkpoint or (train["eval_every"] and position.step % train["eval_every"] == 0)
            at_log = position.step % train["log_every"] == 0 or at_checkpoint
            if not (at_log or at_eval):
                continue
            if world > 1:
                window = summed_over_workers(window, device)
            now = time.perf_counter()
            metrics: dict[str, Any] = {
                "step": position.step,
                "epoch": position.epoch,
                "loss": float(window[0] / max(window[1], 1)),
                "lr": float(scheduler.get_last_lr()[0]),
                # Real (non-pad) tokens per second over all workers since the last log.
                "tokens_per_s": float(window[2]) / max(now - window_started, 1e-9),
            }
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if resumed_from is not None:
                metrics["resumed_from_step"] = resumed_from
            if use_gpu:
                metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            window.zero_()
            if at_eval:
                eval_loss = evaluate()
                if eval_loss is not None:
                    metrics["eval_loss"] = eval_loss
                    metrics["eval_perplexity"] = math.exp(min(eval_loss, 50))
                    if eval_loss < best_eval - 1e-6:
                        best_eval, stale_evals = eval_loss, 0
                    else:
                        stale_evals += 1
            patience = train["early_stopping_patience"]
            stop_early = bool(patience and stale_evals >= patience)
            metrics["final"] = is_last or stop_early
            tracker.log(metrics, position.step)
            if rank == 0 and cfg.get("tensorboard_dir"):
                # Plain JSON lines next to the TensorBoard events: readable without TensorBoard.
                append_metrics(Path(cfg["tensorboard_dir"]) / METRICS_FILE, metrics)
            if writer:
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and key not in ("step", "final"):
                        writer.add_scalar(f"train/{key}", value, position.step)
            if rank == 0:
                extra = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
                print(
                    f"[medtune] step {position.step}/{total_steps} loss {metrics['loss']:.4f}"
                    f"{extra} lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s",
                    flush=True,
                )
            if at_checkpoint or stop_early:
                save_and_report(metrics)
            else:
                ray.train.report(metrics)
            window_started = time.perf_counter()  # eval and checkpoint time is not training time
            if is_last or stop_early:
                done = True
                break
        else:
            position.epoch += 1
            position.micro_batches = 0
            done = position.epoch >= max_epochs
    tracker.close()
    if writer:
        writer.close()
    if rank == 0:
        sync_tensorboard(cfg)


def metrics_line(metrics: dict[str, Any]) -> str:
    """One metrics.jsonl line. A non-finite float (a diverged loss) is written as null:
    json.dumps would write NaN or Infinity, which no strict JSON reader accepts."""
    finite = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in metrics.items()
    }
    return json.dumps(finite) + "\n"


def append_metrics(path: Path, metrics: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(metrics_line(metrics))


def keep_metrics_through(path: Path, step: int) -> None:
    """Drop the lines logged after `step`: a run resumed from the checkpoint at `step` logs
    those steps again, and the failed attempt's lines would stand beside them twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by the crash that this run resumes from
        if logged <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    path.write_text("".join(kept))


def resume_metrics(cfg: dict[str, Any], step: int) -> None:
    """Rank 0's metrics.jsonl as a run resumed at `step` continues it.

    A restarted worker may land on another node, without the failed attempt's local file:
    the copy synced to storage at the last checkpoint then carries the earlier steps on
    (the next sync would otherwise overwrite it with the resumed steps alone).
    """
    import posixpath

    from ray_jobs.core.storage import Storage

    path = Path(cfg["tensorboard_dir"]) / METRICS_FILE
    if not path.exists():
        storage = Storage.from_uri(cfg["storage_root"])
        synced = posixpath.join(cfg["tensorboard_rel"], METRICS_FILE)
        if storage.exists(synced):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(storage.read_text(synced))
    keep_metrics_through(path, step)


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


def sync_tensorboard(cfg: dict[str, Any]) -> None:
    """Copy the TensorBoard event files and metrics.jsonl to <storage>/runs/<run>/tensorboard/."""
    from ray_jobs.core.storage import Storage

    if not cfg.get("tensorboard_dir") or not Path(cfg["tensorboard_dir"]).is_dir():
        return
    Storage.from_uri(cfg["storage_root"]).upload_dir(cfg["tensorboard_dir"], cfg["tensorboard_rel"], complete=False)


def load_trainable(model, state: dict[str, Any]) -> list[str]:
    """Copy saved trainable tensors into the model; returns the names it could not find."""
    import torch

    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    return missing


def save_checkpoint(
    directory: Path,
    model,
    engine,
    optimizer,
    scheduler,
    position: Position,
    best_eval: float,
    stale_evals: int,
    rank: int,
) -> None:
    """Write this worker's part of a checkpoint (rank 0 only, except DeepSpeed shards)."""
    import torch

    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    base = {"position": position.as_dict(), "best_eval": best_eval, "stale_evals": stale_evals, "rng": rng}
    if engine is not None:
        # Every rank writes its ZeRO shards; Ray merges the workers' directories.
        # Frozen (e.g. 4-bit base) weights are not state: excluding them keeps a QLoRA checkpoint
        # at the size of the adapter and its optimizer, not the whole base model.
        engine.save_checkpoint(str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        export_adapter(model, directory / ADAPTER_DIR, zero3=engine.zero_optimization_stage() == 3, rank=rank)
        if rank == 0:
            torch.save(base, directory / STATE_FILE)
        return
    if rank != 0:
        return
    torch.save(
        {
            **base,
            "trainable": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        directory / STATE_FILE,
    )
    export_adapter(model, directory / ADAPTER_DIR, zero3=False, rank=rank)


def export_adapter(model, directory: Path, *, zero3: bool, rank: int) -> None:
    """Save the adapter (or full model) in standard format, gathering ZeRO-3 shards first.

    Under ZeRO-3 each rank holds a slice of every parameter; saving without gathering
    writes empty ([0]-shaped) tensors. All ranks must enter the gather; rank 0 writes.
    """
    from peft import PeftModel

    if zero3:
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if rank == 0:
                _save_pretrained(model, directory)
    elif rank == 0:
        _save_pretrained(model, directory)
    if rank == 0 and isinstance(model, PeftModel):
        weights = directory / "adapter_model.safetensors"
        from safetensors.torch import load_file

        empty = [k for k, v in load_file(weights).items() if v.numel() == 0]
        if empty:
            raise RuntimeError(f"saved adapter has empty tensors (ZeRO-3 gather failed): {empty[:3]}")


def _save_pretrained(model, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)


class Tracker:
    """Optional MLflow / W&B logging from rank 0, only when the recipe configures them."""

    def __init__(self, cfg: dict[str, Any], rank: int):
        tracking = cfg["recipe"]["train"]["tracking"]
        self.mlflow = self.wandb = None
        if rank != 0:
            return
        run = cfg.get("run_name") or cfg["recipe"]["name"]
        if tracking.get("mlflow_uri"):
            import mlflow

            mlflow.set_tracking_uri(tracking["mlflow_uri"])
            mlflow.set_experiment(cfg["recipe"]["name"])
            mlflow.start_run(run_name=run)
            self.mlflow = mlflow
        if tracking.get("wandb_project"):
            import wandb

            self.wandb = wandb.init(project=tracking["wandb_project"], name=run, resume="allow", config=cfg["recipe"])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.mlflow:
            self.mlflow.log_metrics(numbers, step=step)
        if self.wandb:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.mlflow:
            self.mlflow.end_run()
        if self.wandb:
            self.wandb.finish()


def _tensorboard(cfg: dict[str, Any], rank: int, resumed_from: int | None):
    if rank != 0 or not cfg.get("tensorboard_dir"):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; stay alive if an image lacks it
        return None
    Path(cfg["tensorboard_dir"]).mkdir(parents=True, exist_ok=True)
    # As for metrics.jsonl: TensorBoard hides the failed attempt's events past the checkpoint.
    purge = resumed_from + 1 if resumed_from is not None else None
    return SummaryWriter(cfg["tensorboard_dir"], purge_step=purge)

"""What a checkpoint holds, and how a worker writes and reads it back.

A checkpoint holds the trainable weights (the LoRA adapter in PEFT format, or the full
model), optimizer, scheduler, RNG states and the data position (epoch, micro-batches
consumed). On restart the worker skips exactly the consumed micro-batches of that epoch,
so a resumed run continues the same data order.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"


class Position:
    """Where training stands: optimizer steps, epoch and micro-batches consumed in it."""

    def __init__(self, step: int = 0, epoch: int = 0, micro_batches: int = 0):
        self.step, self.epoch, self.micro_batches = step, epoch, micro_batches

    def as_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "micro_batches": self.micro_batches}


def trainable_state(model) -> dict[str, Any]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(rng: dict[str, Any]) -> None:
    import torch

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


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

    base = {"position": position.as_dict(), "best_eval": best_eval, "stale_evals": stale_evals, "rng": rng_state()}
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


def restore_checkpoint(directory: Path, model, engine, optimizer, scheduler) -> dict[str, Any]:
    """Load a checkpoint's weights, optimizer and scheduler into this worker; returns the rest
    of its state (position, best_eval, stale_evals, rng) for the caller to take over."""
    import torch

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    if engine is not None:
        engine.load_checkpoint(str(directory / "deepspeed"), load_module_strict=False)
    else:
        missing = load_trainable(model, state["trainable"])
        assert not missing, f"checkpoint lacks trainable weights: {missing[:3]}"
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return state

"""Batched multi-LoRA: every loaded adapter's weights stacked per module, applied per row.

PEFT's mixed-adapter batches (`adapter_names=`) loop over the adapters present in a batch in
every LoRA layer: with 4 adapters on q/k/v/o of a 32-layer model that is thousands of small
kernels per decoding step, and the cost grows with the number of adapters in the batch. Here
each targeted linear layer keeps one stacked tensor per side, A: (slots, r, in) and
B: (slots, out, r) with the LoRA scaling folded into B, and a forward hook adds
`x @ A[slot]^T @ B[slot]^T` for all rows at once (two gathers and two batched matmuls,
whatever the mix of adapters): the scheme of Punica's BGMV and S-LoRA, in plain PyTorch.
Slot 0 is all zeros and stands for the base model; a batch of base-model rows skips the
hooks entirely. Ranks are padded with zeros to the largest loaded rank.

Adapters the bank cannot represent exactly are refused with a reason (AdapterLoadError):
DoRA, LoRA on embeddings, `modules_to_save`, trained biases, non-LoRA PEFT types. The
`mixed` and `per_adapter` engines (PEFT) serve those.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ray_jobs.serve.engine import AdapterLoadError

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name's suffix."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_adapter(folder: str | Path) -> dict[str, tuple[Any, Any]]:
    """An adapter folder as {module name: (A (r, in), B (out, r) times its scaling)} in float32.

    Raises:
        AdapterLoadError: the adapter is not a plain LoRA the bank can apply exactly.
    """
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except Exception as exc:
        raise AdapterLoadError(f"adapter_config.json is unreadable: {type(exc).__name__}: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"peft_type {config.get('peft_type')} is not LoRA")
    refusals = {"use_dora": "DoRA", "modules_to_save": "modules_to_save"}
    for field, what in refusals.items():
        if config.get(field):
            raise AdapterLoadError(f"{what} adapters are not served by the continuous engine; "
                                   "set serve.batching: mixed to serve them through PEFT")
    if config.get("bias", "none") != "none":
        raise AdapterLoadError(f"adapters with trained biases (bias={config['bias']!r}) are not served by the "
                               "continuous engine; set serve.batching: mixed")
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.exists() and not (folder / "adapter_model.bin").exists():
        raise AdapterLoadError("no adapter_model.safetensors")
    try:
        if weights_file.exists():
            tensors = load_file(str(weights_file))
        else:
            tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(f"{weights_file.name} is unreadable: {type(exc).__name__}: {exc}") from None
    sides: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterLoadError(f"tensor {key!r} is not a LoRA A/B weight of a linear layer (LoRA on embeddings "
                                   "and extra trained modules need serve.batching: mixed)")
        sides.setdefault(match["module"], {})[match["side"]] = tensor.float()
    if not sides:
        raise AdapterLoadError("the adapter holds no LoRA weights")
    alpha = config.get("lora_alpha", 8)
    weights = {}
    for module, pair in sides.items():
        if set(pair) != {"A", "B"}:
            raise AdapterLoadError(f"module {module} has lora_{''.join(pair)} without its partner")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise AdapterLoadError(f"module {module}: lora_A rank {rank} but lora_B rank {b.shape[1]}")
        module_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scaling = module_alpha / math.sqrt(rank) if config.get("use_rslora") else module_alpha / rank
        weights[module] = (a, b * scaling)
    return weights


class LoRABank:
    """Stacked LoRA weights for `slots` adapters (slot 0: the base model) on `model`'s linear layers."""

    def __init__(self, model: Any, slots: int):
        import torch

        self.model, self.slots = model, slots
        self.linear = {name: module for name, module in model.named_modules()
                       if hasattr(module, "in_features") and hasattr(module, "out_features")}
        self.dtype = next(model.parameters()).dtype
        if not self.dtype.is_floating_point:  # quantised storage (bitsandbytes): compute in bf16
            self.dtype = torch.bfloat16
        self.device = next(model.parameters()).device
        self.a: dict[str, Any] = {}
        self.b: dict[str, Any] = {}
        self.hooks: dict[str, Any] = {}
        self.row_slots = None
        """(batch,) long tensor on the model's device: each row's slot, set before every forward."""
        self.active = False
        """False while every row is a base-model row: the hooks then add nothing and cost nothing."""

    def set_rows(self, slots: list[int]) -> None:
        import torch

        self.active = any(slots)
        self.row_slots = torch.tensor(slots, dtype=torch.long, device=self.device) if self.active else None

    def check(self, weights: dict[str, tuple[Any, Any]]) -> None:
        """Raise AdapterLoadError unless every module exists in the base model with matching shapes."""
        for module, (a, b) in weights.items():
            layer = self.linear.get(module)
            if layer is None:
                raise AdapterLoadError(f"the base model has no linear layer {module!r}: the adapter was trained "
                                       "for another architecture")
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise AdapterLoadError(f"module {module}: adapter shapes {tuple(a.shape)}/{tuple(b.shape)} do not "
                                       f"fit the base layer ({layer.in_features} -> {layer.out_features})")

    def write(self, slot: int, weights: dict[str, tuple[Any, Any]]) -> None:
        """Put an adapter (checked with `check`) into `slot`, zeroing the modules it does not target."""
        import torch

        assert 0 < slot < self.slots
        self.clear(slot)
        for module, (a, b) in weights.items():
            rank = a.shape[0]
            if module not in self.a or self.a[module].shape[1] < rank:
                self._grow(module, rank)
            with torch.no_grad():
                self.a[module][slot, :rank].copy_(a.to(self.device, self.dtype))
                self.b[module][slot, :, :rank].copy_(b.to(self.device, self.dtype))

    def clear(self, slot: int) -> None:
        for module in self.a:
            self.a[module][slot].zero_()
            self.b[module][slot].zero_()

    def _grow(self, module: str, rank: int) -> None:
        """Allocate (or widen to `rank`) the stacked tensors of one module, keeping what they hold."""
        import torch

        layer = self.linear[module]
        a = torch.zeros(self.slots, rank, layer.in_features, dtype=self.dtype, device=self.device)
        b = torch.zeros(self.slots, layer.out_features, rank, dtype=self.dtype, device=self.device)
        if module in self.a:
            old = self.a[module].shape[1]
            a[:, :old].copy_(self.a[module])
            b[:, :, :old].copy_(self.b[module])
        self.a[module], self.b[module] = a, b
        if module not in self.hooks:
            self.hooks[module] = layer.register_forward_hook(self._hook(module))

    def _hook(self, module: str):
        import torch

        def add_lora(_layer, args, output):
            if not self.active:
                return output
            x = args[0]
            slots = self.row_slots
            a = self.a[module].index_select(0, slots)  # (batch, r, in)
            b = self.b[module].index_select(0, slots)  # (batch, out, r)
            hidden = torch.bmm(x.to(self.dtype), a.transpose(1, 2))
            return output + torch.bmm(hidden, b.transpose(1, 2)).to(output.dtype)

        return add_lora

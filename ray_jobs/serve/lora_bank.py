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


def unservable_fields(lora: dict[str, Any]) -> list[str]:
    """The LoRA settings the bank cannot apply exactly, among `use_dora`, `modules_to_save` and
    `bias`: the same keys in a PEFT adapter_config.json and in a recipe's `lora` section."""
    return [key for key, set_ in (("use_dora", bool(lora.get("use_dora"))),
                                  ("modules_to_save", bool(lora.get("modules_to_save"))),
                                  ("bias", (lora.get("bias") or "none") != "none")) if set_]


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
    refused = unservable_fields(config)
    if refused:
        what = {"use_dora": "DoRA adapters", "modules_to_save": "modules_to_save adapters",
                "bias": f"adapters with trained biases (bias={config.get('bias')!r})"}[refused[0]]
        raise AdapterLoadError(f"{what} are not served by the continuous engine; "
                               "set serve.batching: mixed to serve them through PEFT")
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
    """Every loaded adapter's LoRA weights, concatenated per module; slot 0 is the base model.

    Per targeted linear layer: A (in, slots x r) holds every slot's A transposed side by side,
    B (slots x r, out) every slot's B (times its scaling) stacked. For a batch, a row mask
    (batch, 1, slots x r) keeps each row's own slot's r columns, so one forward hook is three
    kernels whatever the mix of adapters: `h = x @ A`, `h *= mask`, `out += h @ B`. Computing
    x @ A for every slot costs slots x r columns per token, small next to the layer itself while
    slots x r stays well below the hidden size (8 adapters of rank 16: 144 columns for 4,096).
    An earlier gather-per-row design (index_select A and B, two bmm) cost twice the kernels and
    was launch-bound on an H100 (adapters at 31% of base tokens/s).
    """

    def __init__(self, model: Any, slots: int):
        import torch

        self.model, self.slots = model, slots
        self.linear = {name: module for name, module in model.named_modules()
                       if hasattr(module, "in_features") and hasattr(module, "out_features")}
        self.dtype = next(model.parameters()).dtype
        if not self.dtype.is_floating_point:  # quantised storage (bitsandbytes): compute in bf16
            self.dtype = torch.bfloat16
        self.device = next(model.parameters()).device
        self.rank = 0
        """Columns per slot: the largest rank loaded so far (smaller ranks are zero-padded)."""
        self.a: dict[str, Any] = {}
        self.b: dict[str, Any] = {}
        self.hooks: dict[str, Any] = {}
        self.row_mask = None
        """(batch, 1, columns up to the end of the batch's highest slot), set before every forward."""
        self._masks: dict[tuple[int, ...], Any] = {}

    @property
    def active(self) -> bool:
        """False while every row is a base-model row: the hooks then add nothing and cost nothing."""
        return self.row_mask is not None

    def set_rows(self, slots: list[int]) -> None:
        import torch

        if not any(slots):
            self.row_mask = None
            return
        key = tuple(slots)
        if key not in self._masks:
            if len(self._masks) > 64:  # batch compositions change as rows come and go: keep a few
                self._masks.clear()
            mask = torch.zeros(len(slots), 1, (max(slots) + 1) * self.rank, dtype=self.dtype)
            for row, slot in enumerate(slots):
                if slot:
                    mask[row, 0, slot * self.rank:(slot + 1) * self.rank] = 1
            self._masks[key] = mask.to(self.device)
        self.row_mask = self._masks[key]

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
        rank = max(a.shape[0] for a, _ in weights.values())
        if rank > self.rank:
            self._widen(rank)
        self.clear(slot)
        columns = slice(slot * self.rank, slot * self.rank + rank)
        for module, (a, b) in weights.items():
            if module not in self.a:
                self._allocate(module)
            r = a.shape[0]
            with torch.no_grad():
                self.a[module][:, columns][:, :r].copy_(a.T.to(self.device, self.dtype))
                self.b[module][columns][:r].copy_(b.T.to(self.device, self.dtype))

    def clear(self, slot: int) -> None:
        columns = slice(slot * self.rank, (slot + 1) * self.rank)
        for module in self.a:
            self.a[module][:, columns].zero_()
            self.b[module][columns].zero_()

    def _allocate(self, module: str) -> None:
        import torch

        layer = self.linear[module]
        self.a[module] = torch.zeros(layer.in_features, self.slots * self.rank, dtype=self.dtype, device=self.device)
        self.b[module] = torch.zeros(self.slots * self.rank, layer.out_features, dtype=self.dtype, device=self.device)
        self.hooks[module] = layer.register_forward_hook(self._hook(module))

    def _widen(self, rank: int) -> None:
        """Re-lay every module's tensors with `rank` columns per slot, keeping what they hold."""
        import torch

        old = self.rank
        for module in list(self.a):
            a, b = self.a[module], self.b[module]
            wide_a = torch.zeros(a.shape[0], self.slots * rank, dtype=self.dtype, device=self.device)
            wide_b = torch.zeros(self.slots * rank, b.shape[1], dtype=self.dtype, device=self.device)
            for slot in range(self.slots):
                wide_a[:, slot * rank:slot * rank + old] = a[:, slot * old:(slot + 1) * old]
                wide_b[slot * rank:slot * rank + old] = b[slot * old:(slot + 1) * old]
            self.a[module], self.b[module] = wide_a, wide_b
        self.rank = rank
        self._masks.clear()

    def _hook(self, module: str):
        import torch

        views: dict[int, tuple[Any, Any]] = {}  # width -> (A, B) column views: no slicing per call
        same_dtype = self.linear[module].weight.dtype == self.dtype

        def add_lora(_layer, args, output):
            # Every dispatcher call here costs tens of microseconds of CPU on a launch-bound
            # decoding step (128+ hooks per token): keep it to the three kernels.
            mask = self.row_mask
            if mask is None:
                return output
            width = mask.shape[-1]
            pair = views.get(width)
            if pair is None or pair[0].data_ptr() != self.a[module].data_ptr():  # new width, or widened bank
                pair = views[width] = (self.a[module][:, :width], self.b[module][:width])
            x = args[0] if same_dtype else args[0].to(self.dtype)
            hidden = torch.matmul(x, pair[0]).mul_(mask)  # each row keeps only its own adapter's columns
            if same_dtype:
                return output.add_(torch.matmul(hidden, pair[1]))
            return output.add_(torch.matmul(hidden, pair[1]).to(output.dtype))

        return add_lora

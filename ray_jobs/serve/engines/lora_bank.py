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

from ray_jobs.core.engines import unservable_fields
from ray_jobs.serve.engines.base import AdapterLoadError

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
    refused = unservable_fields(config)
    if refused:
        what = {
            "use_dora": "DoRA adapters",
            "modules_to_save": "modules_to_save adapters",
            "bias": f"adapters with trained biases (bias={config.get('bias')!r})",
        }[refused[0]]
        raise AdapterLoadError(
            f"{what} are not served by the continuous engine; set serve.batching: mixed to serve them through PEFT"
        )
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
            raise AdapterLoadError(
                f"tensor {key!r} is not a LoRA A/B weight of a linear layer (LoRA on embeddings "
                "and extra trained modules need serve.batching: mixed)"
            )
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


# Sibling projections that read the same input: their A sides are multiplied in one matmul.
SHARED_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"}, {"query", "key", "value"})


class _Group:
    """Targeted linear layers that read one input (q/k/v, gate/up), or a single layer.

    A holds every member's A for every slot side by side, (in, members x slots x r); each
    member keeps its own B, (slots x r, out). The first member's hook computes
    `h = (x @ A) * mask` for all members; its siblings, seeing the same input tensor, reuse it.
    """

    def __init__(self, members: list[str], a, b: dict[str, Any]):
        self.members, self.a, self.b = members, a, b
        self.x = self.hidden = None

    def columns(self, module: str, slot: int, rank: int, slots: int) -> slice:
        start = self.members.index(module) * slots * rank + slot * rank
        return slice(start, start + rank)


class LoRABank:
    """Every loaded adapter's LoRA weights, concatenated per module; slot 0 is the base model.

    Per targeted linear layer, B (slots x r, out) stacks every slot's B (times its scaling); A
    (in, slots x r) holds every slot's A transposed side by side, and the A sides of siblings that
    read one input (q/k/v, gate/up) sit in one tensor. For a batch, a row mask (batch, slots x r,
    repeated per sibling) keeps each row's own slot's r columns, so whatever the mix of adapters
    a group of siblings costs `h = x @ A`, `h *= mask` once, then one `out += h @ B` (addmm) per
    member. Computing x @ A for every slot costs slots x r columns per token, small next to the
    layer itself while slots x r stays well below the hidden size (8 adapters of rank 16: 144
    columns for 4,096). Decoding is launch-bound, so the number of operators per hook is what
    counts: an earlier gather-per-row design (index_select A and B, two bmm) reached 31% of base
    tokens/s on an H100, one matmul-mask-matmul-add hook per module 29% on an H200.
    """

    def __init__(self, model: Any, slots: int):
        import torch

        self.model, self.slots = model, slots
        self.linear = {
            name: module
            for name, module in model.named_modules()
            if hasattr(module, "in_features") and hasattr(module, "out_features")
        }
        self.dtype = next(model.parameters()).dtype
        if not self.dtype.is_floating_point:  # quantised storage (bitsandbytes): compute in bf16
            self.dtype = torch.bfloat16
        self.device = next(model.parameters()).device
        self.rank = 0
        """Columns per slot: the largest rank loaded so far (smaller ranks are zero-padded)."""
        self.groups: dict[str, _Group] = {}
        """Module name -> its group; siblings share one _Group."""
        self._distinct: list[_Group] = []  # each group once, in allocation order
        self.hooks: dict[str, Any] = {}
        self.row_mask = None
        """(batch, 1, slots x r) for the rows of the next forward; None while every row is a base-model row."""
        self._masks: dict[tuple[int, ...], Any] = {}
        self._repeated: dict[int, Any] = {}  # members -> the row mask repeated for that many siblings

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
            mask = torch.zeros(len(slots), 1, self.slots * self.rank, dtype=self.dtype)
            for row, slot in enumerate(slots):
                if slot:
                    mask[row, 0, slot * self.rank : (slot + 1) * self.rank] = 1
            self._masks[key] = mask.to(self.device)
        self.row_mask = self._masks[key]
        self._repeated = {1: self.row_mask}

    def _mask_for(self, members: int):
        mask = self._repeated.get(members)
        if mask is None:
            mask = self._repeated[members] = self.row_mask.repeat(1, 1, members)
        return mask

    def check(self, weights: dict[str, tuple[Any, Any]]) -> None:
        """Raise AdapterLoadError unless every module exists in the base model with matching shapes."""
        for module, (a, b) in weights.items():
            layer = self.linear.get(module)
            if layer is None:
                raise AdapterLoadError(
                    f"the base model has no linear layer {module!r}: the adapter was trained for another architecture"
                )
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise AdapterLoadError(
                    f"module {module}: adapter shapes {tuple(a.shape)}/{tuple(b.shape)} do not "
                    f"fit the base layer ({layer.in_features} -> {layer.out_features})"
                )

    def write(self, slot: int, weights: dict[str, tuple[Any, Any]]) -> None:
        """Put an adapter (checked with `check`) into `slot`, zeroing the modules it does not target."""
        import torch

        assert 0 < slot < self.slots
        rank = max(a.shape[0] for a, _ in weights.values())
        if rank > self.rank:
            self._widen(rank)
        missing = [module for module in weights if module not in self.groups]
        if missing:
            self._allocate(missing)
        self.clear(slot)
        for module, (a, b) in weights.items():
            group, r = self.groups[module], a.shape[0]
            columns = group.columns(module, slot, self.rank, self.slots)
            with torch.no_grad():
                group.a[:, columns][:, :r].copy_(a.T.to(self.device, self.dtype))
                group.b[module][slot * self.rank : slot * self.rank + r].copy_(b.T.to(self.device, self.dtype))

    def clear(self, slot: int) -> None:
        for group in self._distinct:
            for module in group.members:
                columns = group.columns(module, slot, self.rank, self.slots)
                group.a[:, columns].zero_()
                group.b[module][slot * self.rank : (slot + 1) * self.rank].zero_()

    def _allocate(self, modules: list[str]) -> None:
        """Give `modules` (targeted for the first time) their tensors and hooks.

        A new module joins no existing group (its siblings' hooks are already running with
        theirs): siblings group only when first targeted together, which is the common case
        of one recipe's adapters all targeting the same modules.
        """
        by_parent: dict[tuple[str, str], list[str]] = {}
        for module in modules:
            parent, _, leaf = module.rpartition(".")
            family = next((",".join(sorted(f)) for f in SHARED_INPUT if leaf in f), module)
            by_parent.setdefault((parent, family), []).append(module)
        width = self.slots * self.rank
        for members in by_parent.values():
            members.sort()
            inputs = {self.linear[m].in_features for m in members}
            if len(inputs) > 1:  # not really siblings: one group each
                for module in members:
                    self._allocate_group([module], width)
                continue
            self._allocate_group(members, width)

    def _allocate_group(self, members: list[str], width: int) -> None:
        import torch

        fan_in = self.linear[members[0]].in_features
        group = _Group(
            members,
            torch.zeros(fan_in, len(members) * width, dtype=self.dtype, device=self.device),
            {m: torch.zeros(width, self.linear[m].out_features, dtype=self.dtype, device=self.device) for m in members},
        )
        self._distinct.append(group)
        for module in members:
            self.groups[module] = group
            self.hooks[module] = self.linear[module].register_forward_hook(self._hook(module, group))

    def _widen(self, rank: int) -> None:
        """Re-lay every group's tensors with `rank` columns per slot, keeping what they hold."""
        import torch

        old = self.rank
        for group in self._distinct:
            a = torch.zeros(
                group.a.shape[0], len(group.members) * self.slots * rank, dtype=self.dtype, device=self.device
            )
            for module in group.members:
                for slot in range(self.slots):
                    target = group.columns(module, slot, rank, self.slots)
                    a[:, target.start : target.start + old] = group.a[:, group.columns(module, slot, old, self.slots)]
            group.a = a
            for module, b in group.b.items():
                wide = torch.zeros(self.slots * rank, b.shape[1], dtype=self.dtype, device=self.device)
                for slot in range(self.slots):
                    wide[slot * rank : slot * rank + old] = b[slot * old : (slot + 1) * old]
                group.b[module] = wide
            group.x = group.hidden = None
        self.rank = rank
        self._masks.clear()

    def _hook(self, module: str, group: _Group):
        import torch

        same_dtype = self.linear[module].weight.dtype == self.dtype
        first = group.members.index(module) * self.slots  # this member's first column, in units of rank

        def add_lora(_layer, args, output):
            # Decoding is launch-bound (every operator costs CPU time the GPU waits for): the
            # first sibling pays matmul + mask for the group, each member one addmm.
            mask = self.row_mask
            if mask is None:
                return output
            x = args[0]
            if x is not group.x or group.hidden is None:
                hidden = torch.matmul(x if same_dtype else x.to(self.dtype), group.a)  # (batch, tokens, columns)
                members_mask = self._mask_for(len(group.members))
                hidden.mul_(members_mask if hidden.dim() == 3 else members_mask[:, 0])
                group.x, group.hidden = x, hidden.view(-1, hidden.shape[-1])
            width = self.slots * self.rank
            hidden = group.hidden[:, first * self.rank : first * self.rank + width]
            flat_out = output.view(-1, output.shape[-1])
            if same_dtype:
                flat_out.addmm_(hidden, group.b[module])
            else:
                flat_out.add_(torch.mm(hidden, group.b[module]).to(output.dtype))
            return output

        return add_lora

    def release_inputs(self) -> None:
        """Drop the inputs the groups remember (called after each forward, so they are not kept alive)."""
        for group in self._distinct:
            group.x = group.hidden = None

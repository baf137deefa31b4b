"""Variable-length attention for packed training rows.

A packed row holds several documents; their position ids restart at 0 where each one
begins. With `sdpa`, transformers keeps the documents apart with a [tokens x tokens] mask,
and a mask rules out SDPA's flash kernel. `varlen` instead hands the document boundaries
(cumulative lengths) to Flash Attention's variable-length kernel
(`torch.nn.attention.varlen.varlen_attn`, PyTorch >= 2.10, CUDA): no mask, no padding, and
work proportional to the sum of squared document lengths rather than the row's square.

Training only: the function sees whole packed rows, never a KV cache, so inference
(evaluate, serve) loads the same model with `sdpa`. On CPU, or in fp32, the same
boundaries run through plain causal SDPA one document at a time: the reference the
kernel is checked against in the tests.
"""

from __future__ import annotations

import inspect
from typing import Any

NAME = "medtune_varlen"
"""The name registered with transformers' AttentionInterface."""


def varlen_kernel():
    """PyTorch's varlen flash-attention function, or None where this PyTorch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available_on(device) -> bool:
    """True where `varlen` runs the flash kernel (a CUDA device of compute capability >= 8)."""
    import torch

    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or varlen_kernel() is None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def training_attention(requested: str, device) -> str:
    """The attention implementation a training worker loads the model with."""
    if requested == "auto":
        return NAME if available_on(device) else "sdpa"
    if requested == "varlen":
        return NAME
    return requested


def inference_attention(requested: str) -> str:
    """Evaluation and serving decode with a KV cache, which `varlen` does not handle."""
    return "sdpa" if requested in ("auto", "varlen") else requested


def document_bounds(position_ids) -> tuple[Any, int]:
    """(cumulative document starts as int32 [documents + 1], longest document) of a batch.

    A document starts at each row's first token and wherever the position does not follow
    the previous one (packed documents restart at 0, padding too): the rule transformers
    uses to detect packed rows.
    """
    import torch

    batch, width = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    first = starts.reshape(-1).nonzero().flatten()
    cumulative = torch.cat([first, first.new_tensor([batch * width])]).to(torch.int32)
    return cumulative, int((cumulative[1:] - cumulative[:-1]).max())


class _BoundsCache:
    """Every layer of one forward pass gets the same position_ids tensor: compute its
    boundaries (one device sync) once per pass, not once per layer."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, position_ids):
        if self.key is not position_ids:
            self.key, self.value = position_ids, document_bounds(position_ids)
        return self.value


_bounds = _BoundsCache()


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention interface: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, S, Hq, D]."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[2] != key.shape[2]:
        raise ValueError(f"attention '{NAME}' is for training on whole packed rows (it needs position_ids "
                         "and no KV cache); load the model with sdpa for generation")
    if dropout:
        raise ValueError(f"attention '{NAME}' does not implement attention dropout; set the model's attention_dropout to 0")
    batch, q_heads, width, head_dim = query.shape
    kv_heads = key.shape[1]
    cumulative, longest = _bounds.get(position_ids)
    # [B, H, S, D] -> [B*S, H, D]: the layout of flash attention's varlen kernels.
    q = query.transpose(1, 2).reshape(batch * width, q_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * width, kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(batch * width, kv_heads, head_dim)
    import torch

    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_kernel() is not None:
        out = _flash(q, k, v, cumulative.to(q.device), longest, scaling)
    else:
        out = _per_document_sdpa(q, k, v, cumulative, scaling)
    return out.reshape(batch, width, q_heads, head_dim), None


def _flash(q, k, v, cumulative, longest: int, scaling: float | None):
    kernel = varlen_kernel()
    params = inspect.signature(kernel).parameters
    kwargs: dict[str, Any] = {"scale": scaling}
    # PyTorch 2.10 spelled causality `is_causal`; later releases a (left, right) window.
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return kernel(q, k, v, cumulative, cumulative, longest, longest, **kwargs)


def _per_document_sdpa(q, k, v, cumulative, scaling: float | None):
    import torch
    import torch.nn.functional as F

    pieces = []
    bounds = cumulative.tolist()
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:]):
        dq, dk, dv = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        if groups > 1:
            dk, dv = dk.repeat_interleave(groups, dim=0), dv.repeat_interleave(groups, dim=0)
        pieces.append(F.scaled_dot_product_attention(dq, dk, dv, is_causal=True, scale=scaling).transpose(0, 1))
    return torch.cat(pieces)


def register() -> None:
    """Make `attn_implementation="medtune_varlen"` loadable (idempotent, per process)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)

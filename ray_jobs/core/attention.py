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

Plain causal attention only: a model whose layers attend through a sliding window
(Mistral v0.1, Gemma 2/3, Qwen2 with `use_sliding_window`) or softcap their attention
logits (Gemma 2) trains with sdpa (eager for softcapping, which sdpa lacks) under `auto`,
and an explicit `varlen` for it is refused: the kernel call would drop the window or the
cap and train a different model than the one that is served.
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


WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")
"""`config.layer_types` entries whose attention sees only part of the causal past."""


def unsupported_features(config) -> list[str]:
    """What the model's attention does beyond plain causal attention, which `varlen` cannot do.

    Empty for Llama-style models. `config`: the model's (for a multimodal model, the text
    model's config is read).
    """
    text = _text_config(config)
    features = []
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        # Per-layer models (Gemma 2/3, Qwen2) pass a window only to the layers listed as windowed.
        windowed = sorted(set(layer_types) & set(WINDOWED_LAYER_TYPES))
        if windowed:
            features.append(f"{' and '.join(windowed)} layers (sliding_window={getattr(text, 'sliding_window', None)})")
    elif getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True) is not False:
        features.append(f"sliding window attention (sliding_window={text.sliding_window})")
    if getattr(text, "attn_logit_softcapping", None) is not None:
        features.append(f"attention logit softcapping (attn_logit_softcapping={text.attn_logit_softcapping})")
    return features


def training_attention(requested: str, device, config) -> str:
    """The attention implementation a training worker loads the model with.

    Args:
        requested: the recipe's `model.attn_implementation`.
        device: the worker's device (`auto` picks varlen only where its flash kernel runs).
        config: the model's transformers config; `auto` falls back from varlen for a model
            with sliding windows or softcapped attention logits.

    Raises:
        ValueError: `varlen` was asked for a model whose attention it cannot compute.
    """
    features = unsupported_features(config)
    if requested == "auto":
        if features:
            return plain_attention_for(config)
        return NAME if available_on(device) else "sdpa"
    if requested == "varlen":
        if features:
            raise ValueError(
                f"model.attn_implementation: varlen computes plain causal attention, but this model uses "
                f"{'; '.join(features)}; use auto or {plain_attention_for(config)}"
            )
        return NAME
    return requested


def plain_attention_for(config) -> str:
    """sdpa, or eager where the model softcaps attention logits: sdpa has no softcap."""
    return "eager" if getattr(_text_config(config), "attn_logit_softcapping", None) is not None else "sdpa"


def _text_config(config):
    # A multimodal model's attention settings live in its text model's config.
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def inference_attention(requested: str, config=None) -> str:
    """Evaluation and serving decode with a KV cache, which `varlen` does not handle: sdpa
    (eager for a model that softcaps attention logits, given its `config`)."""
    if requested not in ("auto", "varlen"):
        return requested
    return plain_attention_for(config) if config is not None else "sdpa"


def row_positions(position_ids, batch: int, width: int):
    """The position ids of every query row, as [batch, width].

    Packed rows carry their own positions, restarting at 0 where each document starts
    ([batch, width], as `collate` builds them). When the caller passes none, transformers
    fills in one shared [1, width] arange: every row is then a single document, as sdpa
    treats it too. Any other shape (another width, 3-D multimodal positions) names no
    document boundaries this function can trust, so it is refused.
    """
    if position_ids is None:
        raise ValueError(f"attention '{NAME}' needs position_ids to find the documents of a packed row")
    if position_ids.dim() == 2 and position_ids.shape[1] == width and position_ids.shape[0] in (1, batch):
        return position_ids.expand(batch, width)
    raise ValueError(
        f"attention '{NAME}': position_ids of shape {tuple(position_ids.shape)} do not match the "
        f"query's {batch} rows of {width} tokens; pass [{batch}, {width}] positions that restart "
        "at 0 where each packed document starts"
    )


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
        self.key, self.shape, self.value = None, None, None

    def get(self, position_ids, batch: int, width: int):
        # Keyed on the tensor the model passes (a shared [1, width] one is expanded per call).
        if self.key is not position_ids or self.shape != (batch, width):
            rows = row_positions(position_ids, batch, width)
            self.key, self.shape, self.value = position_ids, (batch, width), document_bounds(rows)
        return self.value


_bounds = _BoundsCache()


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers attention interface: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, S, Hq, D]."""
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"attention '{NAME}' is for training on whole packed rows (it needs position_ids "
            "and no KV cache); load the model with sdpa for generation"
        )
    if dropout:
        raise ValueError(
            f"attention '{NAME}' does not implement attention dropout; set the model's attention_dropout to 0"
        )
    refuse_unsupported(kwargs)
    batch, q_heads, width, head_dim = query.shape
    kv_heads = key.shape[1]
    cumulative, longest = _bounds.get(kwargs.get("position_ids"), batch, width)
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


def refuse_unsupported(kwargs: dict[str, Any]) -> None:
    """A layer that asks for a sliding window or logit softcap gets an error, not plain attention.

    `training_attention` keeps such models off varlen; this guards a model loaded with it
    by hand (or a config the check did not foresee).
    """
    asked = {name: kwargs[name] for name in ("sliding_window", "softcap") if kwargs.get(name) is not None}
    if asked:
        settings = ", ".join(f"{name}={value}" for name, value in asked.items())
        raise ValueError(
            f"attention '{NAME}' computes plain causal attention and cannot apply {settings}; "
            "train this model with model.attn_implementation: auto"
        )


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

"""The model a training worker trains, and how much of it recomputes activations.

- `load_training_model` loads the base (quantised as the recipe asks), applies Liger kernels
  on GPU and wraps it with LoRA unless the recipe fine-tunes it in full.
- `checkpoint_plan` decides `gradient_checkpointing: auto` from one probe step: how many
  decoder layers must recompute their activations for a step to fit the memory budget.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from ray_jobs.core.modeling import summed_loss
from ray_jobs.core.recipe import LoraConfig, ModelConfig, TrainConfig

LORA_TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}


def lora_targets(targets: str | list[str]) -> str | list[str]:
    if isinstance(targets, list):
        return targets
    if targets == "all-linear":
        return "all-linear"
    return list(LORA_TARGETS[targets])


def build_model(cfg: dict[str, Any], device, zero3: bool):
    """`load_training_model` from a plain dict: {"model_dir": ..., "recipe": {"model": ...,
    "lora": ..., "train": ...}}, each section as a recipe dumps it (missing keys take the
    recipe's defaults). For callers outside a training run: tests, benchmarks."""
    recipe = cfg["recipe"]
    return load_training_model(
        ModelConfig.model_validate(recipe["model"]),
        LoraConfig.model_validate(recipe.get("lora", {})),
        TrainConfig.model_validate(recipe.get("train", {})),
        cfg["model_dir"],
        device,
        zero3=zero3,
    )


def load_training_model(
    model_cfg: ModelConfig,
    lora: LoraConfig,
    train: TrainConfig,
    model_dir: str,
    device,
    *,
    zero3: bool,
    init_adapter_dir: str | None = None,
):
    """Load the base (quantised as asked), wrap it with LoRA unless full fine-tuning; with
    `init_adapter_dir`, the LoRA weights start as that adapter's (lora.init_from)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoConfig

    from ray_jobs.core import attention
    from ray_jobs.core.modeling import load_model

    # The config alone (no weights) says whether the model's attention is one varlen computes.
    config = AutoConfig.from_pretrained(
        model_dir, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    attn = attention.training_attention(model_cfg.attn_implementation, device, config)
    if attn == attention.NAME:
        attention.register()
    model = load_model(model_cfg, model_dir, device=device, zero3=zero3, attn_implementation=attn)
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
    if train.method == "lora":
        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                bias=lora.bias,
                target_modules=lora_targets(lora.targets),
                modules_to_save=lora.modules_to_save or None,
                use_rslora=lora.use_rslora,
                use_dora=lora.use_dora,
                task_type="CAUSAL_LM",
            ),
        )
        if init_adapter_dir is not None:
            load_parent_adapter(model, init_adapter_dir)
        trainable_in_fp32(model)
    # `auto` starts without; the Trainer turns it on after a probe step if needed.
    if train.gradient_checkpointing is True:
        enable_checkpointing(model, quantized=model_cfg.quantization != "none")
    if device is not None and torch.device(device).type == "cpu":
        model = model.float() if model_cfg.quantization == "none" else model
    return model


def load_parent_adapter(model, adapter_dir: str) -> None:
    """Copy a published adapter's weights into the freshly wrapped model (same rank and
    targets: the driver checked), so training continues from them."""
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"lora.init_from: the adapter in {adapter_dir} does not fit this model "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )


def trainable_in_fp32(model) -> None:
    """Cast the trainable parameters that PEFT left in the base's dtype to fp32.

    PEFT makes the LoRA weights fp32 (its `autocast_adapter_dtype`), but copies
    `modules_to_save` and leaves trained biases in the base's bf16/fp16:
    AdamW updates smaller than bf16's resolution then round away, and
    prepare_model_for_kbit_training's fp32 cast, which would cover them, is not applied. The
    frozen base keeps its dtype; autocast (GPU) or DeepSpeed's own cast meets the mix. (A
    trained copy of the embeddings puts out fp32, so the residual stream runs in fp32 then,
    as under any fp32-master mixed precision.)
    """
    import torch

    for param in model.parameters():
        # Plain parameters only: a bitsandbytes weight (a Parameter subclass) is packed storage.
        if param.requires_grad and param.dtype != torch.float32 and type(param) is torch.nn.Parameter:
            param.data = param.data.float()


def autocast(model_cfg: ModelConfig, device):
    """bf16/fp16 autocast on GPU, as HF Trainer's `bf16=True` does.

    PEFT keeps LoRA weights in fp32; without autocast their fp32 outputs promote the residual
    stream and attention to fp32, which runs at a fraction of the bf16 tensor-core speed.
    """
    import torch

    if device is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    name = model_cfg.quant.compute_dtype if model_cfg.quantization == "4bit" else model_cfg.dtype
    dtype = {"fp16": torch.float16, "fp32": None}.get(name, torch.bfloat16)
    return torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()


def uses_liger(train: TrainConfig, device) -> bool:
    import torch

    return train.liger_kernels and device is not None and torch.device(device).type == "cuda"


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

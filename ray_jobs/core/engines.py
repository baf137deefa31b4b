"""Which engine generates (vLLM or transformers), and what medtune hands vLLM, built without
importing it: engine arguments from the recipe, sampling parameters from a request, LoRA
requests from the adapter cache, and the checks vLLM would make of an adapter folder. Serving
and evaluation both use it; CI has no vLLM, so these translations are tested there and the
engines only wrap them in vLLM's own types.

vLLM's `PEFTHelper.validate_legal` refuses adapter bias, DoRA, `modules_to_save` and ranks
above `max_lora_rank`; its loader refuses weights for modules it cannot apply LoRA to. vLLM
caches an adapter by its id, so a published folder is never overwritten: a new version is a
new folder and a new id.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.modeling import DTYPES
from ray_jobs.core.recipe import Recipe


class EngineUnavailableError(MedtuneError):
    """serve.engine or eval.engine names an engine this process cannot run."""


def unservable_fields(lora: dict[str, Any]) -> list[str]:
    """The LoRA settings that vLLM and the stacked LoRA bank cannot apply, among `use_dora`,
    `modules_to_save` and `bias`: the same keys in a PEFT adapter_config.json and in a recipe's
    `lora` section. Adapters using them are served by PEFT's static batches."""
    return [
        key
        for key, set_ in (
            ("use_dora", bool(lora.get("use_dora"))),
            ("modules_to_save", bool(lora.get("modules_to_save"))),
            ("bias", (lora.get("bias") or "none") != "none"),
        )
        if set_
    ]


def recipe_lora_blockers(recipe: Recipe) -> list[str]:
    """The recipe's own LoRA settings that neither vLLM nor the stacked LoRA bank can apply."""
    return [f"lora.{key}" for key in unservable_fields(recipe.lora.model_dump())]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_engine(choice: str, recipe: Recipe, *, has_vllm: bool, has_gpu: bool) -> tuple[str, str]:
    """("vllm" | "hf", why) for serve.engine / eval.engine `choice` (auto | vllm | hf).

    Raises:
        EngineUnavailableError: `vllm` was asked for and cannot run here.
    """
    if choice == "hf":
        return "hf", "asked for"
    blockers = recipe_lora_blockers(recipe)
    missing = [
        what
        for what, ok in (
            ("vLLM is not installed (pip install 'medtune[vllm]')", has_vllm),
            ("no GPU is visible to this process", has_gpu),
            (f"the recipe's adapters use {', '.join(blockers)}", not blockers),
            ("model.dtype fp32: vLLM's LoRA kernels take bf16 or fp16", recipe.model.dtype != "fp32"),
        )
        if not ok
    ]
    if choice == "vllm" and missing:
        raise EngineUnavailableError(f"engine vllm cannot run here: {'; '.join(missing)}")
    if missing:
        return "hf", "; ".join(missing)
    return "vllm", "vLLM and a GPU are available"


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for max_lora_rank."""
VLLM_DTYPES = {"auto": "auto", **DTYPES}


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in an adapter folder (r and its rank_pattern)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def vllm_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def vllm_problems(adapter_dir: str | Path, max_lora_rank: int = 64) -> list[str]:
    """Reasons vLLM would refuse this adapter folder (empty: loadable)."""
    folder = Path(adapter_dir)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return [f"{folder}: no adapter_config.json"]
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        return [f"adapter_config.json is not JSON: {exc}"]
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}: vLLM serves LoRA only")
    for key in unservable_fields(config):
        problems.append(
            {
                "use_dora": "use_dora: vLLM does not support DoRA",
                "bias": f"bias {config.get('bias')!r}: vLLM does not support adapter bias",
                "modules_to_save": f"modules_to_save {config.get('modules_to_save')}: vLLM serves "
                "LoRA A/B matrices only",
            }[key]
        )
    rank = adapter_rank(folder)
    if rank > max_lora_rank:
        problems.append(f"rank {rank} exceeds max_lora_rank {max_lora_rank} (serve.vllm.max_lora_rank)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        problems.append("no adapter_model.safetensors")
    else:
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:  # a truncated or foreign file
            return [*problems, f"adapter_model.safetensors is unreadable: {type(exc).__name__}"]
        odd = [k for k in keys if "lora_A" not in k and "lora_B" not in k]
        if odd:
            problems.append(f"weights other than LoRA A/B matrices (e.g. {odd[0]}): vLLM refuses them")
    return problems


def lora_limits(recipe: Recipe, adapter_ranks: list[int], listed: int | None = None) -> dict[str, int]:
    """max_loras, max_lora_rank and max_cpu_loras: the recipe's serve.vllm values, else derived
    from the adapters served (`listed`, default serve.adapters; their ranks, read at start-up,
    and the recipe's own lora.r)."""
    cfg = recipe.serve.vllm
    listed = len(recipe.serve.adapters) if listed is None else listed
    max_loras = cfg.max_loras or (min(listed, 16) if listed else 4)
    rank = cfg.max_lora_rank or vllm_rank(max([recipe.lora.r, *adapter_ranks]))
    max_cpu = cfg.max_cpu_loras or max(max_loras, recipe.serve.max_loaded_adapters)
    return {"max_loras": max_loras, "max_lora_rank": rank, "max_cpu_loras": max_cpu}


def engine_args(recipe: Recipe, model_dir: str, adapter_ranks: list[int], listed: int | None = None) -> dict[str, Any]:
    """Keyword arguments of vLLM's (Async)EngineArgs for the recipe's base model and adapters
    (serve.vllm's settings; evaluation uses them too).

    A quantised recipe's adapters are served on the unquantised base by default (the usual
    practice: LoRA trained on a 4-bit base applies to the bf16 weights it approximates);
    serve.keep_quantization quantises the base in flight with bitsandbytes instead."""
    cfg, model = recipe.serve.vllm, recipe.model
    args: dict[str, Any] = dict(
        model=model_dir,
        tokenizer=model_dir,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        dtype=VLLM_DTYPES[model.dtype],
        served_model_name=recipe.serve.served_model_name or model.base,
        enable_lora=True,
        **lora_limits(recipe, adapter_ranks, listed),
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enforce_eager=cfg.enforce_eager,
        max_logprobs=20,
        disable_log_stats=True,
    )
    for key in ("max_model_len", "max_num_seqs"):
        if getattr(cfg, key) is not None:
            args[key] = getattr(cfg, key)
    if model.quantization != "none" and recipe.serve.keep_quantization:
        if model.quantization != "4bit":
            raise ValueError(
                "serve.keep_quantization: vLLM quantises a base in flight to 4-bit only; model.quantization is 8bit"
            )
        args.update(quantization="bitsandbytes", load_format="bitsandbytes")
    return args


def lora_request_fields(key: str, lora_id: int, local_path: str) -> dict[str, Any]:
    """vLLM LoRARequest fields for adapter `name@version` cached at `local_path`. The id is
    the engine's own for that key: a new version gets a new id, so vLLM never serves a
    cached copy of an older one."""
    return {"lora_name": key, "lora_int_id": lora_id, "lora_path": str(Path(local_path).resolve())}


def structured_output_fields(
    response_format: dict[str, Any] | None, json_whitespace: bool = True
) -> dict[str, Any] | None:
    """vLLM StructuredOutputsParams fields for an OpenAI response_format (None: free text)."""
    if not response_format or response_format.get("type") == "text":
        return None
    spacing = {} if json_whitespace else {"disable_any_whitespace": True}
    if response_format["type"] == "json_object":
        return {"json_object": True, **spacing}
    return {"json": response_format["json_schema"]["schema"], **spacing}


def sampling_fields(request: Any, json_whitespace: bool = True) -> dict[str, Any]:
    """vLLM SamplingParams fields for one serving GenerationRequest (structured outputs as a dict)."""
    fields: dict[str, Any] = dict(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p if request.temperature > 0 else 1.0,
        seed=request.seed,
        stop=list(request.stop),
        ignore_eos=request.ignore_eos,
        logprobs=request.logprobs,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        skip_special_tokens=True,
    )
    structured = structured_output_fields(request.response_format, json_whitespace)
    if structured is not None:
        fields["structured_outputs"] = structured
    return fields

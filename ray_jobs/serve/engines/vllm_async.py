"""vLLM as medtune's GPU engine: its async engine inside the Serve replica (serve.engine: vllm).

vLLM's `AsyncLLM` runs the model in its own engine-core process (paged KV cache, CUDA graphs,
prefix cache, chunked prefill, batched multi-LoRA kernels, grammar-constrained decoding). The
replica keeps medtune's layer above it: the adapter registry and versions, API keys, errors,
admission, metrics and PHI-free logs; only token ids and LoRA requests cross over.

Adapters: each `name@version` gets its own LoRA id and is added to the engine from the
node-local cache when first asked for; beyond serve.max_loaded_adapters the least recently
used one that no running request needs is removed again (vLLM itself keeps max_loras of them
on the GPU and max_cpu_loras in host memory).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from ray_jobs.core.engines import engine_args, lora_request_fields, sampling_fields, vllm_problems
from ray_jobs.core.recipe import Recipe
from ray_jobs.serve.engines.base import AdapterEvent, AdapterLoadError, Delta, GenerationRequest, LogprobEntry

log = logging.getLogger("ray.serve")


class VLLMEngine:
    """The `Engine` protocol over vLLM's AsyncLLM."""

    name = kind = "vllm"
    supports = frozenset({"logprobs", "ignore_eos", "response_format", "presence_penalty", "frequency_penalty"})

    def __init__(self, model_dir: str, recipe: Recipe, adapter_ranks: list[int], on_adapter_event: AdapterEvent):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from ray_jobs.core.modeling import load_tokenizer

        args = engine_args(recipe, model_dir, adapter_ranks)
        log.info("starting vLLM: %s", {k: v for k, v in args.items() if k not in ("model", "tokenizer")})
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self.device = "cuda"
        self.tokenizer = load_tokenizer(
            model_dir, recipe.model.revision, recipe.model.trust_remote_code, recipe.model.chat_template
        )
        self.context_length = self.engine.vllm_config.model_config.max_model_len
        self.max_lora_rank, self.max_loaded = args["max_lora_rank"], recipe.serve.max_loaded_adapters
        self.loaded: OrderedDict[str, str] = OrderedDict()  # key -> local path, least recently used first
        self.ids: dict[str, int] = {}
        self.next_id = itertools.count(1)
        self.in_use: Counter[str] = Counter()
        self.load_seconds: dict[str, float] = {}
        self.on_adapter_event = on_adapter_event
        self.lock = asyncio.Lock()
        self.json_whitespace = recipe.serve.vllm.json_whitespace

    def loaded_adapters(self) -> list[str]:
        return list(self.loaded)

    def _lora_request(self, key: str, local_path: str):
        from vllm.lora.request import LoRARequest

        lora_id = self.ids.setdefault(key, next(self.next_id))
        return LoRARequest(**lora_request_fields(key, lora_id, local_path))

    async def load_adapter(self, key: str, local_path: str) -> float:
        async with self.lock:
            if key in self.loaded:
                self.loaded.move_to_end(key)
                return 0.0
            problems = await asyncio.to_thread(vllm_problems, local_path, self.max_lora_rank)
            if problems:
                raise AdapterLoadError("; ".join(problems))
            started = time.perf_counter()
            try:
                await self.engine.add_lora(self._lora_request(key, local_path))
            except Exception as exc:
                raise AdapterLoadError(f"vLLM could not load it: {type(exc).__name__}: {exc}") from None
            seconds = time.perf_counter() - started
            self.loaded[key], self.load_seconds[key] = local_path, round(seconds, 4)
            self.on_adapter_event("load", key, seconds)
            await self._evict(keep=key)
            return seconds

    async def _evict(self, keep: str) -> None:
        for candidate in list(self.loaded):  # least recently used first
            if len(self.loaded) <= self.max_loaded:
                return
            if candidate == keep or self.in_use[candidate]:
                continue
            del self.loaded[candidate]
            await self.engine.remove_lora(self.ids[candidate])
            self.on_adapter_event("evict", candidate, 0.0)

    def _logprobs(self, output: Any, top: int) -> list[LogprobEntry]:
        entries = []
        for token, position in zip(output.token_ids, output.logprobs or []):
            chosen = position[token]
            ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)[:top]
            entries.append(
                LogprobEntry(
                    chosen.decoded_token or "",
                    chosen.logprob,
                    [(lp.decoded_token or "", lp.logprob) for _, lp in ranked],
                )
            )
        return entries

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        fields = sampling_fields(request, self.json_whitespace)
        if "structured_outputs" in fields:
            fields["structured_outputs"] = StructuredOutputsParams(**fields["structured_outputs"])
        params = SamplingParams(**fields, output_kind=RequestOutputKind.DELTA)
        lora = None
        if request.adapter:
            if request.adapter not in self.loaded:  # evicted since the registry loaded it
                await self.load_adapter(request.adapter, request.adapter_path)
            self.loaded.move_to_end(request.adapter)
            lora = self._lora_request(request.adapter, self.loaded[request.adapter])
            self.in_use[request.adapter] += 1
        try:
            async for output in self.engine.generate(
                {"prompt_token_ids": request.prompt_ids}, params, uuid.uuid4().hex, lora_request=lora
            ):
                if request.first_token_at is None:
                    request.first_token_at = time.perf_counter()
                completion = output.outputs[0]
                delta = Delta(text=completion.text, tokens=len(completion.token_ids))
                if request.logprobs is not None:
                    delta.logprobs = self._logprobs(completion, request.logprobs)
                if output.finished:
                    delta.finish_reason = "length" if completion.finish_reason == "length" else "stop"
                yield delta
        finally:
            if request.adapter:
                self.in_use[request.adapter] -= 1

"""The transformers + PEFT generation engine: one base model, many LoRA adapters.

Design decisions:
- The base model is loaded once per replica; adapters are loaded into the same PeftModel on
  first use (from local or S3 storage) and evicted least-recently-used beyond a bound.
- Requests for different adapters are generated in one batch: PEFT's `adapter_names=`
  routes each row through its own adapter (`__base__` for the plain base model).
- The engine is the seam for other backends (e.g. vLLM through Ray Serve LLM): the app
  depends only on `GenerationEngine`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

log = logging.getLogger("medtune.serve")
BASE = "__base__"


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None
    """Resolved adapter key (`name@version`) or None for the base model."""
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    completion_tokens: int
    finish_reason: str


class GenerationEngine(Protocol):
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...
    def stream(self, request: GenerationRequest) -> Iterator[str]: ...


class AdapterLoadError(RuntimeError):
    """An adapter exists but could not be loaded; only requests for it fail."""


class HFEngine:
    """Batched generation with transformers + PEFT on CPU or GPU."""

    def __init__(self, model_dir: str, model_cfg: Any, max_loaded_adapters: int = 8, device: str | None = None):
        import torch

        from ray_jobs.models import load_model, load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_dir, model_cfg.revision, model_cfg.trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_cfg, model_dir, device=self.device)
        self.model.eval()
        self.max_loaded = max_loaded_adapters
        self.loaded: OrderedDict[str, str] = OrderedDict()  # key -> local path
        self.lock = threading.RLock()  # PEFT adapter bookkeeping is not thread-safe
        self.stats = {"loads": 0, "evictions": 0}
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) or self.tokenizer.eos_token_id
        self.eos_ids = eos if isinstance(eos, list) else [eos]
        self.context_length = getattr(self.model.config, "max_position_embeddings", 4096)

    # ------------------------------------------------------------------ adapters
    def ensure_adapter(self, key: str, local_path: str) -> float:
        """Load adapter `key` from `local_path` unless loaded; returns load seconds (0 if cached)."""
        from peft import PeftModel

        with self.lock:
            if key in self.loaded:
                self.loaded.move_to_end(key)
                return 0.0
            started = time.perf_counter()
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(local_path, adapter_name=key)
                else:
                    self.model = PeftModel.from_pretrained(self.model, local_path, adapter_name=key)
                    self.model.eval()
            except Exception as exc:
                raise AdapterLoadError(f"adapter {key} could not be loaded: {type(exc).__name__}: {exc}") from None
            self.loaded[key] = local_path
            self.stats["loads"] += 1
            while len(self.loaded) > self.max_loaded:
                evicted, _ = self.loaded.popitem(last=False)
                self.model.delete_adapter(evicted)
                self.stats["evictions"] += 1
            return time.perf_counter() - started

    # ------------------------------------------------------------------ generation
    def _batch_inputs(self, requests: list[GenerationRequest]):
        import torch

        width = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row ends at the same column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate_kwargs(self, requests: list[GenerationRequest]) -> dict[str, Any]:
        from peft import PeftModel

        first = requests[0]
        sample = first.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(r.max_tokens for r in requests), do_sample=sample,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
        )
        if sample:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = [r.adapter or BASE for r in requests]
        return kwargs

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate for a mixed batch. Requests with different sampling settings or seeds
        run in separate sub-batches, since one `generate` call takes one setting."""
        import torch

        groups: dict[tuple, list[int]] = {}
        for index, r in enumerate(requests):
            groups.setdefault((r.temperature, r.top_p, r.seed), []).append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        for (temperature, _top_p, seed), members in groups.items():
            batch = [requests[i] for i in members]
            ids, mask = self._batch_inputs(batch)
            with self.lock, torch.no_grad():
                if seed is not None:
                    torch.manual_seed(seed)
                output = self.model.generate(input_ids=ids, attention_mask=mask, **self._generate_kwargs(batch))
            for row, index in enumerate(members):
                results[index] = self._finish(requests[index], output[row, ids.shape[1]:].tolist())
        return [r for r in results if r is not None]

    def _finish(self, request: GenerationRequest, new_ids: list[int]) -> GenerationResult:
        finish = "length"
        for position, token in enumerate(new_ids):
            if token in self.eos_ids:
                new_ids, finish = new_ids[:position], "stop"
                break
        new_ids = new_ids[: request.max_tokens]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        for stop in request.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return GenerationResult(text, len(new_ids), finish)

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield text pieces as they are generated (one request)."""
        import torch
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids, mask = self._batch_inputs([request])
        kwargs = {**self._generate_kwargs([request]), "streamer": streamer}

        def work() -> None:
            with self.lock, torch.no_grad():
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        emitted = ""
        for piece in streamer:
            candidate = emitted + piece
            stop_at = min((candidate.find(s) for s in request.stop if s in candidate), default=-1)
            if stop_at >= 0:
                if stop_at > len(emitted):
                    yield candidate[len(emitted):stop_at]
                break
            emitted = candidate
            if piece:
                yield piece
        thread.join()

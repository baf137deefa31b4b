"""PEFT's static batches: one base model, many LoRA adapters, `generate` per batch.

Design decisions:
- The base model is loaded once per replica; adapters are loaded into the same PeftModel on
  first use (from local or S3 storage) and evicted least-recently-used beyond a bound.
  Adapters a running batch needs are pinned, so a load for another request never evicts them.
- Requests for different adapters are generated in one batch: PEFT's `adapter_names=`
  routes each row through its own adapter (`__base__` for the plain base model).
- Streaming requests join the same batches: a batch-wide streamer hands each row's tokens
  to its request's callback, so streams are batched (and mixed) like everything else.
- A row stops as soon as it is finished on its own terms (its max_tokens, end of turn) or
  is cancelled (timeout, client gone): a stopping criterion marks it done, and the batch
  ends when every row is done, so a timed-out request frees the model at once.
- Adapter files are checked (config parses, weights readable) before PEFT touches the
  model: a corrupt adapter fails alone and leaves the model as it was.
- It generates from a thread; `HFEngineStreams` (ray_jobs.serve.engines.hf_streams) turns it
  into the async `Engine` protocol the app uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ray_jobs.serve.engines.base import (
    AdapterLoadError,
    GenerationRequest,
    GenerationResult,
    check_adapter_dir,
    cut_at_stops,
    eos_token_ids,
)

log = logging.getLogger("ray.serve")
BASE = "__base__"


class _RowsDone:
    """Stopping criterion: a row is done when cancelled or at its own max_tokens."""

    def __init__(self, requests: list[GenerationRequest], prompt_width: int):
        self.requests, self.prompt_width = requests, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        produced = input_ids.shape[1] - self.prompt_width
        now = time.perf_counter()
        done = []
        for request in self.requests:
            if produced >= 1 and request.first_token_at is None:
                request.first_token_at = now
            done.append(request.cancelled or produced >= request.max_tokens)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowStreamer:
    """A transformers streamer for a whole batch: hands each row's new tokens to its request's
    `on_token` until the row ends (end of turn, max_tokens, cancelled)."""

    def __init__(self, requests: list[GenerationRequest], eos_ids: list[int]):
        self.requests, self.eos_ids = requests, set(eos_ids)
        self.counts = [0] * len(requests)
        self.ended = [r.on_token is None for r in requests]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            request = self.requests[row]
            if self.ended[row]:
                continue
            if token in self.eos_ids or request.cancelled:
                self.ended[row] = True
                continue
            request.on_token(token, None)
            self.counts[row] += 1
            if self.counts[row] >= request.max_tokens:
                self.ended[row] = True

    def end(self) -> None:
        pass


class StaticEngine:
    """Static batches with transformers + PEFT on CPU or GPU (serve.batching: mixed / per_adapter).

    Args:
        on_adapter_event: called with ("load", key, seconds) and ("evict", key, 0.0), for metrics.
    """

    def __init__(
        self,
        model_dir: str,
        model_cfg: Any,
        max_loaded_adapters: int = 8,
        device: str | None = None,
        on_adapter_event: Callable[[str, str, float], None] | None = None,
        batching: str = "mixed",
    ):
        import torch

        from ray_jobs.core.modeling import load_model, load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(
            model_dir, model_cfg.revision, model_cfg.trust_remote_code, model_cfg.chat_template
        )
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_cfg, model_dir, device=self.device)
        self.model.eval()
        self.max_loaded = max_loaded_adapters
        self.loaded: OrderedDict[str, str] = OrderedDict()  # key -> local path
        self.lock = threading.RLock()  # PEFT adapter bookkeeping and generate are not thread-safe
        self.stats = {"loads": 0, "evictions": 0}
        self.load_seconds: dict[str, float] = {}
        self.batching = batching
        self.on_adapter_event = on_adapter_event or (lambda kind, key, seconds: None)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.context_length = getattr(self.model.config, "max_position_embeddings", 4096)

    # ------------------------------------------------------------------ adapters
    def ensure_adapter(self, key: str, local_path: str, pinned: Iterable[str] = ()) -> float:
        """Load adapter `key` from `local_path` unless loaded; returns load seconds (0 if cached).

        Raises:
            AdapterLoadError: the files are corrupt or do not fit the base model.
        """
        from peft import PeftModel

        with self.lock:
            if key in self.loaded:
                self.loaded.move_to_end(key)
                return 0.0
            started = time.perf_counter()
            check_adapter_dir(local_path)
            options = dict(adapter_name=key, autocast_adapter_dtype=False, low_cpu_mem_usage=True)
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(local_path, **options)
                else:
                    self.model = PeftModel.from_pretrained(self.model, local_path, **options)
                    self.model.eval()
            except Exception as exc:
                if isinstance(self.model, PeftModel) and key in self.model.peft_config:
                    self.model.delete_adapter(key)  # leave no half-loaded adapter behind
                raise AdapterLoadError(f"adapter {key} could not be loaded: {type(exc).__name__}: {exc}") from None
            self.loaded[key] = local_path
            self.stats["loads"] += 1
            seconds = time.perf_counter() - started
            self.load_seconds[key] = round(seconds, 4)
            self.on_adapter_event("load", key, seconds)
            keep = {key, *pinned}
            for candidate in list(self.loaded):
                if len(self.loaded) <= self.max_loaded:
                    break
                if candidate in keep:
                    continue
                del self.loaded[candidate]
                self.model.delete_adapter(candidate)
                self.stats["evictions"] += 1
                self.on_adapter_event("evict", candidate, 0.0)
            return seconds

    def _reload_evicted(self, requests: list[GenerationRequest]) -> None:
        """Reload adapters evicted between a request's admission and its batch (call under lock)."""
        needed = {r.adapter: r.adapter_path for r in requests if r.adapter}
        for key, path in needed.items():
            if key not in self.loaded:
                if path is None:
                    raise AdapterLoadError(f"adapter {key} is not loaded and has no path")
                self.ensure_adapter(key, path, pinned=needed)
            else:
                self.loaded.move_to_end(key)

    # ------------------------------------------------------------------ generation
    def _batch_inputs(self, requests: list[GenerationRequest]):
        import torch

        width = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row ends at the same column
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate_kwargs(self, requests: list[GenerationRequest], prompt_width: int) -> dict[str, Any]:
        from peft import PeftModel
        from transformers import StoppingCriteriaList

        first = requests[0]
        sample = first.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(r.max_tokens for r in requests),
            do_sample=sample,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_RowsDone(requests, prompt_width)]),
        )
        if sample:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
        else:  # the model's generation_config may carry sampling defaults; greedy means greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = [r.adapter or BASE for r in requests]
        return kwargs

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate for a batch that may mix adapters. Requests with different sampling
        settings run in separate sub-batches, since one `generate` call takes one setting."""
        import torch

        from ray_jobs.core.modeling import decoding_attention

        groups: dict[tuple, list[int]] = {}
        for index, r in enumerate(requests):
            split = (r.adapter,) if self.batching == "per_adapter" else ()
            groups.setdefault((*r.sampling_key(), *split), []).append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        for (_temperature, _top_p, seed, *_), members in groups.items():
            batch = [requests[i] for i in members]
            live = [r for r in batch if not r.cancelled]
            if live:
                ids, mask = self._batch_inputs(live)
                with self.lock, torch.no_grad():
                    self._reload_evicted(live)
                    if seed is not None:
                        torch.manual_seed(seed)
                    kwargs = self._generate_kwargs(live, ids.shape[1])
                    if any(r.on_token for r in live):  # streaming rows ride in the same batch
                        kwargs["streamer"] = _RowStreamer(live, self.eos_ids)
                    with decoding_attention(self.model.device):
                        output = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
                new_tokens = {id(r): output[row, ids.shape[1] :].tolist() for row, r in enumerate(live)}
            for index in members:
                request = requests[index]
                if request.cancelled:
                    results[index] = GenerationResult("", 0, "cancelled")
                else:
                    results[index] = self._finish(request, new_tokens[id(request)])
        return [r for r in results if r is not None]

    def _finish(self, request: GenerationRequest, new_ids: list[int]) -> GenerationResult:
        finish = "length"
        for position, token in enumerate(new_ids):
            if token in self.eos_ids:
                new_ids, finish = new_ids[:position], "stop"
                break
        new_ids = new_ids[: request.max_tokens]
        text, finish = cut_at_stops(self.tokenizer.decode(new_ids, skip_special_tokens=True), request.stop, finish)
        return GenerationResult(text, len(new_ids), finish)

"""The transformers + PEFT generation engine: one base model, many LoRA adapters.

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
- The engine is the seam for other backends (e.g. vLLM through Ray Serve LLM): the app
  depends only on `GenerationEngine`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("ray.serve")
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
    adapter_path: str | None = None
    """Local directory of the adapter, so the engine can reload it if it was evicted."""
    cancelled: bool = False
    """Set by the caller (timeout, client gone); the engine stops this row at the next token."""
    first_token_at: float | None = None
    """perf_counter() when the first new token of this row was produced (time to first token)."""
    on_token: Callable[[int], None] | None = None
    """Streaming: called from the generating thread with each new token id of this row."""

    def sampling_key(self) -> tuple:
        # Greedy decoding ignores seed and top_p: such requests share one batch.
        return (0.0, 1.0, None) if self.temperature == 0 else (self.temperature, self.top_p, self.seed)


@dataclass
class GenerationResult:
    text: str
    completion_tokens: int
    finish_reason: str
    """stop, length, or cancelled."""


class GenerationEngine(Protocol):
    tokenizer: Any
    context_length: int
    loaded: OrderedDict[str, str]

    def ensure_adapter(self, key: str, local_path: str) -> float: ...
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a turn: the model's generation config, else the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def cut_at_stops(text: str, stops: list[str], finish: str) -> tuple[str, str]:
    """`text` up to the first of the request's stop strings, with finish "stop" if one occurs."""
    for stop in stops:
        cut = text.find(stop)
        if cut >= 0:
            text, finish = text[:cut], "stop"
    return text, finish


class AdapterLoadError(RuntimeError):
    """An adapter exists but could not be loaded; only requests for it fail."""


def check_adapter_dir(path: str) -> None:
    """Raise AdapterLoadError unless `path` holds a readable PEFT LoRA adapter."""
    from peft import PeftConfig
    from safetensors import safe_open

    folder = Path(path)
    try:
        json.loads((folder / "adapter_config.json").read_text())
        PeftConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise AdapterLoadError(f"adapter_config.json is unreadable: {type(exc).__name__}: {exc}") from None
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        if (folder / "adapter_model.bin").exists():
            return
        raise AdapterLoadError("no adapter_model.safetensors")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():  # reads every tensor: truncated files fail here, not in PEFT
                handle.get_tensor(name)
    except Exception as exc:
        raise AdapterLoadError(f"adapter_model.safetensors is unreadable: {type(exc).__name__}: {exc}") from None


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
            request.on_token(token)
            self.counts[row] += 1
            if self.counts[row] >= request.max_tokens:
                self.ended[row] = True

    def end(self) -> None:
        pass


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    Decodes only a short window (the offsets scheme of TGI and vLLM): the previous piece's
    tokens give the context that tokenizers with word-start markers need, and the cost per
    token stays constant however long the answer grows.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix_offset = self.read_offset = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):  # nothing new, or half a character
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


class HFEngine:
    """Batched generation with transformers + PEFT on CPU or GPU.

    Args:
        on_adapter_event: called with ("load", key, seconds) and ("evict", key, 0.0), for metrics.
    """

    def __init__(self, model_dir: str, model_cfg: Any, max_loaded_adapters: int = 8, device: str | None = None,
                 on_adapter_event: Callable[[str, str, float], None] | None = None, batching: str = "mixed"):
        import torch

        from ray_jobs.models import load_model, load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_dir, model_cfg.revision, model_cfg.trust_remote_code)
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
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate_kwargs(self, requests: list[GenerationRequest], prompt_width: int) -> dict[str, Any]:
        from peft import PeftModel
        from transformers import StoppingCriteriaList

        first = requests[0]
        sample = first.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(r.max_tokens for r in requests), do_sample=sample,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
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

        from ray_jobs.models import decoding_attention

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
                new_tokens = {id(r): output[row, ids.shape[1]:].tolist() for row, r in enumerate(live)}
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

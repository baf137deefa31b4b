"""The continuous-batching engine: requests join and leave the running batch between tokens.

`@serve.batch` with `model.generate` (the `mixed` engine) runs static batches: a request that
arrives while a batch is generating waits for the whole batch to finish, and every row waits
for the longest. Here one decode loop owns the model:

- each iteration admits waiting requests (up to `max_batch_size` rows in flight), prefills
  them as one left-padded batch, and merges their KV cache into the running batch's cache
  (left-padding the shorter in time, so every row's newest token stays in the last column);
- one decoding step then advances every running row by a token, each row with its own
  adapter (`LoRABank`: every adapter's weights side by side, a few operators per layer), its
  own sampling settings and, when it has a seed, its own random generator;
- a row leaves as soon as it ends (end of turn, max_tokens, a stop string, cancelled), and
  cache columns that only padding still uses are dropped.

Position ids are each row's own count of real tokens, so a row's answer does not depend on
which rows it shares a batch with (the tests compare against one-request-at-a-time PEFT).
Long prompts are prefilled whole (no chunked prefill): a very long prompt pauses decoding
of the running rows for its prefill.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ray_jobs.core.modeling import decoding_attention
from ray_jobs.serve.engines.base import (
    AdapterLoadError,
    GenerationRequest,
    GenerationResult,
    TokenLogprobs,
    cut_at_stops,
    eos_token_ids,
)
from ray_jobs.serve.engines.lora_bank import LoRABank, read_adapter

log = logging.getLogger("ray.serve")


class UnsupportedModelError(ValueError):
    """The model's KV cache cannot be merged row by row; serve it with static batches."""


def check_cache_layout(config: Any) -> None:
    """Merging caches needs plain per-layer key/value tensors: refuse sliding-window or
    recurrent layers up front (from the config alone) instead of generating wrong text later.

    Raises:
        UnsupportedModelError: naming the cache layer types the model uses.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    odd = {type(layer).__name__ for layer in DynamicCache(config=config).layers if type(layer) is not DynamicLayer}
    if odd:
        raise UnsupportedModelError(
            f"the continuous engine needs plain KV-cache layers, this model uses "
            f"{sorted(odd)}; set serve.batching: mixed"
        )


@dataclass
class _Row:
    request: GenerationRequest
    future: Future
    slot: int
    generator: Any = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    ended: bool = False


class ContinuousEngine:
    """One base model, many LoRA adapters, continuous batching; CPU or GPU.

    Args:
        max_loaded_adapters: adapter slots; the least recently used adapter that no queued or
            running request needs is evicted to make room.
        max_batch_size: rows decoded together; more requests wait in FIFO order.
        on_adapter_event: called with ("load", key, seconds) and ("evict", key, 0.0), for metrics.
    """

    def __init__(
        self,
        model_dir: str,
        model_cfg: Any,
        max_loaded_adapters: int = 8,
        device: str | None = None,
        on_adapter_event: Callable[[str, str, float], None] | None = None,
        max_batch_size: int = 32,
    ):
        import torch
        from transformers import AutoConfig

        from ray_jobs.core.modeling import load_model, load_tokenizer

        # Before the weights: a model this engine cannot run must not be loaded twice.
        check_cache_layout(
            AutoConfig.from_pretrained(
                model_dir, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
            )
        )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(
            model_dir, model_cfg.revision, model_cfg.trust_remote_code, model_cfg.chat_template
        )
        self.model = load_model(model_cfg, model_dir, device=self.device).eval()
        self.bank = LoRABank(self.model, max_loaded_adapters + 1)
        # transformers 5 renames forward's `past_key_values` to `cache` (the old name warns);
        # architectures not yet ported keep the old name.
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.max_loaded, self.max_batch_size = max_loaded_adapters, max_batch_size
        self.loaded: OrderedDict[str, str] = OrderedDict()  # key -> local path, least recently used first
        self.slot_of: dict[str, int] = {}
        self.in_use: Counter[str] = Counter()  # queued + running rows per adapter: never evicted
        self.stats = {"loads": 0, "evictions": 0}
        self.load_seconds: dict[str, float] = {}
        self.on_adapter_event = on_adapter_event or (lambda kind, key, seconds: None)
        self.eos_ids = set(eos_token_ids(self.model, self.tokenizer))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.context_length = getattr(self.model.config, "max_position_embeddings", 4096)
        self.lock = threading.RLock()  # the model and the bank: one decoding step or one adapter write at a time
        self.waiting: deque[_Row] = deque()
        self.wakeup = threading.Condition()
        self.rows: list[_Row] = []
        self.cache = self.mask = self.positions = self.last = None
        threading.Thread(target=self._loop, name="medtune-decode", daemon=True).start()

    # ------------------------------------------------------------------ adapters
    def ensure_adapter(self, key: str, local_path: str, pinned: Iterable[str] = ()) -> float:
        """Load adapter `key` from `local_path` into a slot unless loaded; returns load seconds (0 if cached).

        Raises:
            AdapterLoadError: the files are corrupt, not servable here, or do not fit the base model;
                or every slot holds an adapter that queued or running requests need.
        """
        with self.lock:
            if key in self.loaded:
                self.loaded.move_to_end(key)
                return 0.0
        started = time.perf_counter()
        weights = read_adapter(local_path)  # every failure is an AdapterLoadError naming the file
        self.bank.check(weights)
        with self.lock:
            if key in self.loaded:  # loaded meanwhile by another request
                return 0.0
            slot = self._free_slot(keep={key, *pinned})
            self.bank.write(slot, weights)
            self.loaded[key], self.slot_of[key] = local_path, slot
            self.stats["loads"] += 1
            seconds = time.perf_counter() - started
            self.load_seconds[key] = round(seconds, 4)
            self.on_adapter_event("load", key, seconds)
            return seconds

    def _free_slot(self, keep: set[str]) -> int:
        used = set(self.slot_of.values())
        free = [slot for slot in range(1, self.bank.slots) if slot not in used]
        if free:
            return free[0]
        for candidate in list(self.loaded):  # least recently used first
            if candidate in keep or self.in_use[candidate]:
                continue
            slot = self.slot_of.pop(candidate)
            del self.loaded[candidate]
            self.bank.clear(slot)
            self.stats["evictions"] += 1
            self.on_adapter_event("evict", candidate, 0.0)
            return slot
        raise AdapterLoadError(
            f"all {self.max_loaded} adapter slots hold adapters that queued or running requests "
            "need; retry, or raise serve.max_loaded_adapters"
        )

    # ------------------------------------------------------------------ requests
    def submit(self, request: GenerationRequest) -> Future:
        """Queue one request; the future resolves to its GenerationResult."""
        future: Future = Future()
        row = _Row(request, future, slot=0)
        with self.wakeup:
            if request.adapter:
                self.in_use[request.adapter] += 1
            self.waiting.append(row)
            self.wakeup.notify()
        return future

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Blocking convenience: submit every request and wait for all of them."""
        futures = [self.submit(request) for request in requests]
        return [future.result() for future in futures]

    # ------------------------------------------------------------------ the decode loop
    def _loop(self) -> None:
        import os

        import torch

        if self.device == "cpu":
            # A second thread running torch with the process's default intra-op pool was 20-40x
            # slower per step than with one thread here (two OpenMP teams contending for the
            # same cores). Ray sets OMP_NUM_THREADS to a replica's CPUs; outside Ray, one thread.
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        while True:
            with self.wakeup:
                while not self.waiting and not self.rows:
                    self.wakeup.wait()
                admitted = []
                while self.waiting and len(self.rows) + len(admitted) < self.max_batch_size:
                    admitted.append(self.waiting.popleft())
            try:
                with self.lock, torch.inference_mode():
                    admitted = [row for row in admitted if self._admit(row)]
                    if admitted:
                        self._prefill(admitted)
                    if self.rows:
                        self._decode()
            except Exception as exc:  # never let the loop die: fail the rows in flight, keep serving
                log.exception("decoding step failed; failing %d rows", len(self.rows) + len(admitted))
                for row in {id(r): r for r in [*self.rows, *admitted]}.values():
                    self._end(row, error=exc)
                self.rows, self.cache = [], None

    def _admit(self, row: _Row) -> bool:
        """Resolve the row's adapter slot and sampler; False (and the row ended) if it cannot run."""
        import torch

        request = row.request
        # From here on the future cannot be cancelled (the caller sets request.cancelled instead).
        if not row.future.set_running_or_notify_cancel() or request.cancelled:
            self._end(row, "cancelled")
            return False
        if request.adapter:
            try:
                if request.adapter not in self.loaded:  # evicted after the app loaded it: reload
                    if request.adapter_path is None:
                        raise AdapterLoadError(f"adapter {request.adapter} is not loaded and has no path")
                    self.ensure_adapter(request.adapter, request.adapter_path)
                self.loaded.move_to_end(request.adapter)
                row.slot = self.slot_of[request.adapter]
            except AdapterLoadError as exc:
                self._end(row, error=exc)
                return False
        if request.temperature > 0 and request.seed is not None:
            row.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        return True

    def _forward(self, ids, mask, positions, cache, slots: list[int]):
        self.bank.set_rows(slots)
        try:
            with decoding_attention(self.device):
                return self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    **{self._cache_arg: cache},
                    use_cache=True,
                    logits_to_keep=1,
                )
        finally:
            self.bank.release_inputs()

    def _prefill(self, rows: list[_Row]) -> None:
        import torch
        from transformers import DynamicCache

        width = max(len(row.request.prompt_ids) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's newest token in the last column
            prompt = row.request.prompt_ids
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        output = self._forward(ids, mask, positions, DynamicCache(config=self.model.config), [r.slot for r in rows])
        tokens, logprobs = self._sample(output.logits[:, -1], rows)
        self._merge(rows, _output_cache(output), mask, mask.sum(-1), tokens)
        self._advance(rows, tokens, logprobs)

    def _merge(self, rows: list[_Row], cache, mask, positions, tokens: list[int]) -> None:
        """Append prefilled rows to the running batch; the shorter cache is left-padded in time."""
        import torch
        import torch.nn.functional as F

        last = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.positions, self.last = cache, mask, positions, last
            self.rows = list(rows)
            return
        old_width, new_width = self.mask.shape[1], mask.shape[1]
        width = max(old_width, new_width)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            for name in ("keys", "values"):
                old, new = getattr(old_layer, name), getattr(new_layer, name)
                old = F.pad(old, (0, 0, width - old_width, 0))
                new = F.pad(new, (0, 0, width - new_width, 0))
                setattr(old_layer, name, torch.cat([old, new], dim=0))
        self.mask = torch.cat([F.pad(self.mask, (width - old_width, 0)), F.pad(mask, (width - new_width, 0))])
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, last])
        self.rows.extend(rows)

    def _decode(self) -> None:
        import torch

        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        output = self._forward(self.last, self.mask, self.positions[:, None], self.cache, [r.slot for r in self.rows])
        self.cache = _output_cache(output)
        self.positions = self.positions + 1
        tokens, logprobs = self._sample(output.logits[:, -1], self.rows)
        self.last = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        self._advance(self.rows, tokens, logprobs)

    def _sample(self, logits, rows: list[_Row]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Greedy rows take the argmax; sampled rows use their own temperature, top_p and generator.
        Rows that asked for log-probabilities get them from the model's own distribution (before
        temperature and top_p, as vLLM reports them)."""
        import torch

        chosen = logits.argmax(-1)
        for i, row in enumerate(rows):
            request = row.request
            if request.temperature <= 0:
                continue
            probs = torch.softmax(logits[i].float() / request.temperature, dim=-1)
            if request.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs > request.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
            chosen[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
        tokens = chosen.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            top = row.request.logprobs
            if top is None:
                continue
            scores = torch.log_softmax(logits[i].float(), dim=-1)
            best = scores.topk(top) if top else None
            logprobs[i] = TokenLogprobs(
                tokens[i],
                float(scores[tokens[i]]),
                list(zip(best.indices.tolist(), best.values.tolist())) if best else [],
            )
        return tokens, logprobs

    def _advance(self, rows: list[_Row], tokens: list[int], logprobs: list[TokenLogprobs | None]) -> None:
        """Hand each row its new token; end the rows that are done and drop them from the batch."""
        now = time.perf_counter()
        for row, token, logprob in zip(rows, tokens, logprobs):
            request = row.request
            if request.first_token_at is None:
                request.first_token_at = now
            if request.cancelled:
                self._end(row, "cancelled")
                continue
            if token in self.eos_ids and not request.ignore_eos:
                self._end(row, "stop")
                continue
            row.tokens.append(token)
            if logprob is not None:
                row.logprobs.append(logprob)
            if request.on_token is not None:
                request.on_token(token, logprob)
            if request.stop and self._hits_stop(row):
                self._end(row, "stop")
            elif len(row.tokens) >= request.max_tokens:
                self._end(row, "length")
        keep = [i for i, row in enumerate(self.rows) if not row.ended]
        if len(keep) < len(self.rows):
            self._select(keep)

    def _hits_stop(self, row: _Row) -> bool:
        tail = self.tokenizer.decode(row.tokens[-16:], skip_special_tokens=True)  # a stop string ends here, if at all
        return any(stop in tail for stop in row.request.stop)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`, and drop leading cache columns no kept row uses."""
        import torch

        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = self.positions = self.last = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _end(self, row: _Row, finish: str = "stop", error: Exception | None = None) -> None:
        if row.ended:
            return
        row.ended = True
        if row.request.adapter:
            with self.wakeup:
                self.in_use[row.request.adapter] -= 1
        if row.future.cancelled():  # cancelled while it waited: nobody reads the result
            return
        if error is not None:
            row.future.set_exception(error)
            return
        text, finish = cut_at_stops(
            self.tokenizer.decode(row.tokens, skip_special_tokens=True), row.request.stop, finish
        )
        row.future.set_result(GenerationResult(text, len(row.tokens), finish, row.logprobs))


def _output_cache(output):
    """The KV cache a forward returned, under transformers 5's name or the older one."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values

"""The transformers + PEFT engines behind the async `Engine` protocol (serve.engine: hf).

Both HF engines generate in a thread and hand each new token to a callback. This wrapper
turns those tokens into text `Delta`s on the replica's event loop: it decodes incrementally
(never half a UTF-8 character), holds back text that may be the start of a stop string, cuts
at a stop string and then cancels the row, and sends every token that arrived since the last
piece as one piece (each piece costs the event loop, which competes with decoding).

Which HF engine runs: the continuous engine (ray_jobs.serve.engines.hf_continuous) unless the
recipe's adapters use what its LoRA bank cannot apply (DoRA, modules_to_save, trained biases)
or the model's KV cache cannot be merged row by row; then PEFT's static batches
(ray_jobs.serve.engines.hf_static), with a log line. `serve.batching` picks static batches
on purpose (for comparison).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray_jobs.core.engines import recipe_lora_blockers
from ray_jobs.core.recipe import Recipe
from ray_jobs.serve.engines.base import (
    AdapterEvent,
    Delta,
    GenerationRequest,
    GenerationResult,
    IncrementalDecoder,
    LogprobEntry,
    TokenLogprobs,
)

log = logging.getLogger("ray.serve")


CONTINUOUS_SUPPORTS = frozenset({"logprobs", "ignore_eos"})
"""Optional request features the continuous engine honours (PEFT's static batches: none)."""


def hf_engine(model_dir: str, recipe: Recipe, model_cfg: Any, on_adapter_event: AdapterEvent):
    """The thread-side HF engine the recipe calls for (see the module docstring)."""
    from ray_jobs.serve.engines.hf_static import StaticEngine

    cfg = recipe.serve
    if cfg.batching == "continuous":
        from ray_jobs.serve.engines.hf_continuous import ContinuousEngine, UnsupportedModelError

        blockers = recipe_lora_blockers(recipe)
        if blockers:
            log.warning(
                "the recipe's adapters use %s, which the continuous engine cannot apply; "
                "serving with static mixed batches (PEFT) instead",
                ", ".join(blockers),
            )
        else:
            try:
                return ContinuousEngine(
                    model_dir,
                    model_cfg,
                    cfg.max_loaded_adapters,
                    on_adapter_event=on_adapter_event,
                    max_batch_size=cfg.max_batch_size,
                )
            except UnsupportedModelError as error:  # raised before any weights are loaded
                log.warning("%s; serving with static mixed batches instead", error)
    return StaticEngine(
        model_dir,
        model_cfg,
        cfg.max_loaded_adapters,
        on_adapter_event=on_adapter_event,
        batching="mixed" if cfg.batching == "continuous" else cfg.batching,
    )


class _StaticBatcher:
    """Static engines generate whole batches: `serve.batch` gathers concurrent requests into one."""

    def __init__(self, engine: Any, max_batch_size: int, wait_s: float):
        from ray import serve

        self.engine = engine

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)
        async def generate_batch(requests: list[GenerationRequest]) -> list[GenerationResult]:
            return await asyncio.to_thread(self.engine.generate, requests)

        self.generate_batch = generate_batch

    def submit(self, request: GenerationRequest) -> asyncio.Future:
        return asyncio.ensure_future(self.generate_batch(request))


class HFEngineStreams:
    """The `Engine` protocol over a continuous or static HF engine."""

    name = "hf"

    def __init__(self, model_dir: str, recipe: Recipe, model_cfg: Any, on_adapter_event: AdapterEvent):
        self.inner = hf_engine(model_dir, recipe, model_cfg, on_adapter_event)
        self.continuous = hasattr(self.inner, "submit")
        self.tokenizer, self.context_length = self.inner.tokenizer, self.inner.context_length
        self.device, self.load_seconds = self.inner.device, self.inner.load_seconds
        # Per-token log-probabilities and ignoring end of turn are the continuous engine's;
        # PEFT's generate batches share one setting for all rows.
        self.supports = CONTINUOUS_SUPPORTS if self.continuous else frozenset()
        self.batcher = (
            None
            if self.continuous
            else _StaticBatcher(self.inner, recipe.serve.max_batch_size, recipe.serve.batch_wait_timeout_s)
        )

    @property
    def kind(self) -> str:
        return "hf-continuous" if self.continuous else f"hf-{self.inner.batching}"

    def loaded_adapters(self) -> list[str]:
        return list(self.inner.loaded)

    async def load_adapter(self, key: str, local_path: str) -> float:
        return await asyncio.to_thread(self.inner.ensure_adapter, key, local_path)

    def _submit(self, request: GenerationRequest) -> asyncio.Future:
        if self.continuous:
            return asyncio.wrap_future(self.inner.submit(request))
        return self.batcher.submit(request)

    def _entry(self, logprob: TokenLogprobs) -> LogprobEntry:
        text = lambda token: self.tokenizer.decode([token])
        return LogprobEntry(text(logprob.token), logprob.logprob, [(text(t), lp) for t, lp in logprob.top])

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request.on_token = lambda token, logprob: loop.call_soon_threadsafe(queue.put_nowait, (token, logprob))
        decoder = IncrementalDecoder(self.tokenizer)
        held_back = max((len(s) for s in request.stop), default=1) - 1  # a stop string may be half emitted
        pending, emitted, stopped = "", "", False
        future = self._submit(request)
        future.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            ended = False
            while not ended and not stopped:
                arrived = [await queue.get()]
                while not queue.empty():
                    arrived.append(queue.get_nowait())
                ended = arrived[-1] is None
                piece = Delta()
                for token, logprob in arrived[:-1] if ended else arrived:
                    piece.tokens += 1
                    pending += decoder.push(token)
                    if logprob is not None:
                        piece.logprobs.append(self._entry(logprob))
                    cut = min((pending.find(s) for s in request.stop if s in pending), default=-1)
                    if cut >= 0:
                        pending, stopped = pending[:cut], True
                        request.cancelled = True  # the client has its answer; free the row
                        break
                safe = len(pending) if stopped else max(0, len(pending) - held_back)
                piece.text, pending = pending[:safe], pending[safe:]
                emitted += piece.text
                if piece.text or piece.tokens:
                    yield piece
            if stopped:
                yield Delta(finish_reason="stop")
                return
            result = await future
            # The whole answer decoded at once may end in what the incremental decoder held back
            # (half a character, or text that began like a stop string).
            rest = result.text[len(emitted) :] if result.text.startswith(emitted) else pending
            yield Delta(text=rest, finish_reason=result.finish_reason)
        finally:
            request.cancelled = True  # a timed-out or abandoned row stops generating

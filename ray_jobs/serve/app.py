"""The serving stage's routes: an OpenAI-compatible Ray Serve app over one base model and its adapters.

    curl localhost:8000/v1/models
    curl localhost:8000/v1/chat/completions -d '{"model": "quickstart-ner", "messages": [...]}'

The request's `model` picks what answers: the base model's name, an adapter `name` (latest
complete version), `name@version`, or Ray Serve LLM's `base:adapter` (ray_jobs.serve.registry).
The engine behind it is vLLM on a GPU, transformers + PEFT elsewhere (ray_jobs.serve.engines);
this layer is the same for both:
- API keys; overload answered by the replica (ray_jobs.serve.admission: an OpenAI-shaped 503
  with Retry-After, where Serve's proxy would answer in plain text); timeouts as 504 JSON, and
  the generation stops.
- Errors are OpenAI-shaped everywhere, including 404s for unknown routes (ray_jobs.serve.protocol).
- Every request leaves one metric update and one structured log record (ray_jobs.serve.metrics),
  without prompt or completion text unless serve.log_prompts is set.
- `n` answers are n generations of the same prompt (seeds seed, seed+1, ...), run together.
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and
# FastAPI must resolve route annotations (Request) from real objects, not strings.

import asyncio
import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_jobs.core.recipe import Recipe
from ray_jobs.core.storage import Storage
from ray_jobs.serve.admission import Admission
from ray_jobs.serve.engines.base import GenerationRequest
from ray_jobs.serve.metrics import RequestRecord, ServeMetrics, log_request
from ray_jobs.serve.protocol import (
    Answer,
    APIError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    check_features,
    chunk_body,
    parse_request,
    response_body,
    sse,
    usage,
)
from ray_jobs.serve.registry import AdapterRegistry, Target

log = logging.getLogger("ray.serve")
DEFAULT_MAX_TOKENS = 128


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _read_keys(path: str | None) -> set[str]:
    if not path:
        return set()
    keys = {line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")}
    if not keys:
        raise ValueError(f"serve.api_keys_file {path} holds no keys")
    return keys


api = FastAPI(title="medtune", description="OpenAI-compatible serving of medtune adapters")


@api.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error_response(error)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return error_response(APIError(error.status_code, str(error.detail), kind, code=kind))


def _timeout_error(seconds: float) -> APIError:
    return APIError(
        504, f"generation took longer than serve.request_timeout_s ({seconds:g}s)", "server_error", "timeout"
    )


@serve.deployment(name="medtune", health_check_period_s=10)
@serve.ingress(api)
class MedtuneServer:
    """One replica: the base model in its engine, adapters loaded on demand."""

    async def __init__(self, recipe: dict[str, Any]):
        from ray_jobs.core.engines import adapter_rank
        from ray_jobs.core.modeling import resolve_model_dir
        from ray_jobs.serve.engines import build_engine

        self.recipe = Recipe.model_validate(recipe)
        self.cfg = cfg = self.recipe.serve
        storage = Storage.from_uri(self.recipe.storage.root)
        self.metrics = ServeMetrics()
        self.base_name = cfg.served_model_name or self.recipe.model.base
        self.registry = AdapterRegistry(storage, self.base_name, cfg.adapter_refresh_s)
        listed = {}
        for name in cfg.adapters:  # fetched first: their ranks size vLLM's LoRA slots
            try:
                listed[name] = self.registry.fetch(*self.registry.resolve(name))
            except (APIError, OSError) as error:  # a bad one must not stop the rest
                log.warning("adapter %s not preloaded: %s", name, getattr(error, "message", error))
        model_dir = resolve_model_dir(self.recipe.model, storage)
        ranks = [adapter_rank(path) for path in listed.values()]
        loading = time.perf_counter()
        print(f"[medtune] serve: loading {self.recipe.model.base} ...", flush=True)  # the slow part of start-up
        self.engine = build_engine(self.recipe, model_dir, ranks, self.metrics.record_adapter_event)
        self.registry.engine = self.engine
        self.api_keys = _read_keys(cfg.api_keys_file)
        self.admission = Admission(cfg.max_ongoing_requests + cfg.max_queued_requests, hold_s=cfg.request_timeout_s + 5)
        for name in listed:
            try:
                await self.registry.load(name)
            except APIError as error:
                log.warning("adapter %s not preloaded: %s", name, error.message)
        print(
            f"[medtune] serve: replica ready in {time.perf_counter() - loading:.0f} s "
            f"({type(self.engine).__name__}, adapters {', '.join(listed) or 'none'} preloaded)",
            flush=True,
        )

    def check_health(self) -> None:
        """Serve's health check: the replica is healthy once the base model answers."""
        if self.engine.tokenizer is None:
            raise RuntimeError("base model not loaded")

    # ------------------------------------------------------------------ helpers
    def _check_auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if token not in self.api_keys:
            raise APIError(401, "missing or invalid API key", "authentication_error", "invalid_api_key")

    def _prompt_ids(self, body: Sampling, chat: bool) -> list[int]:
        tokenizer = self.engine.tokenizer
        if chat:
            try:
                text = tokenizer.apply_chat_template(
                    body.template_messages(), tokenize=False, add_generation_prompt=True
                )
            except Exception as exc:
                raise APIError(400, f"messages do not fit the model's chat template: {exc}", param="messages") from None
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(body.prompt)["input_ids"]

    def _max_tokens(self, body: Sampling, prompt_tokens: int, chat: bool) -> int:
        context = self.engine.context_length
        asked = body.requested_tokens()
        if prompt_tokens >= context or (asked and prompt_tokens + asked > context):
            raise APIError(
                400,
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({asked or 1}) exceeds the context length {context}",
                code="context_length_exceeded",
                param="messages" if chat else "prompt",
            )
        return asked or min(DEFAULT_MAX_TOKENS, context - prompt_tokens)

    def _requests(self, body: Sampling, target: Target, prompt_ids: list[int], chat: bool) -> list[GenerationRequest]:
        """One generation request per choice; choice i samples with seed + i."""
        first = GenerationRequest(
            prompt_ids,
            target.key,
            self._max_tokens(body, len(prompt_ids), chat),
            body.temperature,
            body.top_p,
            body.seed,
            body.stops(),
            adapter_path=target.local_path,
            logprobs=body.top_logprobs_count(),
            ignore_eos=body.ignore_eos,
            response_format=body.response_format.spec() if body.response_format else None,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
        )
        return [dataclasses.replace(first, seed=None if body.seed is None else body.seed + i) for i in range(body.n)]

    def _finish_record(self, record: RequestRecord, started: float, requests: list[GenerationRequest]) -> None:
        record.latency_s = time.perf_counter() - started
        firsts = [r.first_token_at for r in requests if r.first_token_at is not None]
        if firsts:
            record.ttft_s = min(firsts) - started
        self.metrics.record_request(record)
        log_request(record, self.cfg.log_prompts)

    async def _answer(self, request: GenerationRequest, index: int) -> Answer:
        answer = Answer(index)
        async for delta in self.engine.stream(request):
            answer.add(delta)
        return answer

    # ------------------------------------------------------------------ one request
    async def _run(self, http_request: Request, chat: bool):
        """Answer one chat or completions request; every outcome leaves one metric and log record."""
        started = time.perf_counter()
        deadline = started + self.cfg.request_timeout_s
        record = RequestRecord(endpoint="chat" if chat else "completions")
        requests: list[GenerationRequest] = []
        streaming, place = False, None
        try:
            self._check_auth(http_request)
            place = self.admission.enter()
            if place is None:
                raise APIError(
                    503,
                    f"this replica already holds {self.admission.limit} requests "
                    "(serve.max_ongoing_requests + serve.max_queued_requests); retry later",
                    "server_error",
                    "overloaded",
                    headers={"Retry-After": str(self.cfg.retry_after_s)},
                )
            body = parse_request(await http_request.body(), ChatRequest if chat else CompletionRequest)
            check_features(body, self.engine.kind, self.engine.supports)
            record.stream, record.user = body.stream, body.user_hash()
            if self.cfg.log_prompts:
                record.prompt = body.template_messages() if chat else body.prompt
            target = await self.registry.load(body.model)
            record.adapter, record.adapter_version = target.tag, target.version
            prompt_ids = await asyncio.to_thread(self._prompt_ids, body, chat)
            record.prompt_tokens = len(prompt_ids)
            requests = self._requests(body, target, prompt_ids, chat)
            rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
            with_logprobs = body.top_logprobs_count() is not None
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = self._sse(
                    requests,
                    body.model,
                    rid,
                    created,
                    chat,
                    include_usage,
                    with_logprobs,
                    record,
                    started,
                    deadline,
                    place,
                )
                streaming = True  # from here on the stream records the request when it ends
                return StreamingResponse(events, media_type="text/event-stream")
            try:
                async with asyncio.timeout(deadline - time.perf_counter()):
                    answers = await asyncio.gather(*(self._answer(r, i) for i, r in enumerate(requests)))
            except TimeoutError:
                raise _timeout_error(self.cfg.request_timeout_s) from None
            record.completion_tokens = sum(a.tokens for a in answers)
            record.finish_reason = answers[0].finish_reason
            if self.cfg.log_prompts:
                record.completion = [a.text for a in answers] if len(answers) > 1 else answers[0].text
            return response_body(chat, rid, created, body.model, answers, len(prompt_ids), with_logprobs)
        except APIError as error:
            record.status, record.error_code = error.status, error.code
            raise
        except asyncio.CancelledError:  # the client went away
            record.status, record.error_code = 499, "client_closed"
            raise
        except Exception as exc:
            log.error("request failed: %s", type(exc).__name__)  # no message: it may quote the prompt
            record.status, record.error_code = 500, "internal_error"
            raise APIError(500, f"internal error ({type(exc).__name__})", "server_error", "internal_error") from None
        finally:
            if not streaming:
                for request in requests:
                    request.cancelled = True  # a timed-out or abandoned row stops generating
                self.admission.leave(place)
                self._finish_record(record, started, requests)

    async def _merged(self, requests: list[GenerationRequest], interval: float):
        """(choice index, delta) from every choice's stream, as they come; with serve.stream_interval_s,
        at most one pull per choice per interval, so the tokens of an interval travel together."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, request: GenerationRequest) -> None:
            loop, last = asyncio.get_running_loop(), float("-inf")
            try:
                async for delta in self.engine.stream(request):
                    await queue.put((index, delta))
                    if interval and (wait := last + interval - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    last = loop.time()
            except Exception as exc:
                await queue.put((index, exc))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            open_choices = len(tasks)
            while open_choices:
                index, item = await queue.get()
                if item is None:
                    open_choices -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def _sse(
        self,
        requests: list[GenerationRequest],
        model: str,
        rid: str,
        created: int,
        chat: bool,
        include_usage: bool,
        with_logprobs: bool,
        record: RequestRecord,
        started: float,
        deadline: float,
        place: object,
    ):
        """Server-sent events for one request; the engine batches it with everything else."""
        answers = [Answer(i) for i in range(len(requests))]
        try:
            if chat:
                for index in range(len(requests)):
                    yield sse(chunk_body(chat, rid, created, model, index, None, with_logprobs, role=True))
            try:
                async with asyncio.timeout(deadline - time.perf_counter()):
                    async for index, delta in self._merged(requests, self.cfg.stream_interval_s):
                        answers[index].add(delta)
                        yield sse(chunk_body(chat, rid, created, model, index, delta, with_logprobs))
            except TimeoutError:
                record.status, record.error_code = 504, "timeout"
                yield sse(_timeout_error(self.cfg.request_timeout_s).body())
                yield "data: [DONE]\n\n"
                return
            record.completion_tokens = sum(a.tokens for a in answers)
            record.finish_reason = answers[0].finish_reason
            if self.cfg.log_prompts:
                record.completion = answers[0].text
            if include_usage:
                yield sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(len(requests[0].prompt_ids), record.completion_tokens),
                    }
                )
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            record.status, record.error_code = 499, "client_closed"
            raise
        except Exception as exc:  # headers are sent: the error travels as an event, as OpenAI's do
            log.error("stream failed: %s", type(exc).__name__)
            record.status, record.error_code = 500, "internal_error"
            yield sse(
                APIError(500, f"generation failed ({type(exc).__name__})", "server_error", "internal_error").body()
            )
            yield "data: [DONE]\n\n"
        finally:
            for request in requests:
                request.cancelled = True
            self.admission.leave(place)
            self._finish_record(record, started, requests)

    # ------------------------------------------------------------------ routes
    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "base_model": self.base_name,
            "engine": self.engine.kind,
            "loaded_adapters": self.engine.loaded_adapters(),
            "adapter_load_seconds": self.engine.load_seconds,
            "device": self.engine.device,
        }

    @api.get("/v1/models")
    def models(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        return {"object": "list", "data": self.registry.model_entries()}

    @api.get("/v1/models/{model_id:path}")
    def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        resolved = self.registry.resolve(model_id)
        entry = {"id": self.base_name, "object": "model", "owned_by": "medtune", "root": self.base_name}
        if resolved is not None:
            entry.update(id=model_id, parent=self.base_name, version=resolved[1])
        return entry

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._run(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._run(request, chat=False)

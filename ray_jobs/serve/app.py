"""The serving stage: an OpenAI-compatible Ray Serve app over one base model and its adapters.

    medtune serve RECIPE                                   # blocks; Ctrl-C stops it
    serve run ray_jobs.serve:app_builder recipe=RECIPE      # Ray's own CLI
    # RayService: import_path ray_jobs.serve:app_builder, args {recipe: /etc/medtune/recipe.yaml}

    curl localhost:8000/v1/models
    curl localhost:8000/v1/chat/completions -d '{"model": "quickstart-ner", "messages": [...]}'

The request's `model` picks what answers: the base model's name, an adapter `name`
(latest complete version), `name@version`, or Ray Serve LLM's `base:adapter` form.
Adapters are found under `<storage>/adapters/` and loaded on first use, so a new version
is served without a restart. Names are validated against a strict pattern before they
touch storage, so a request can never reach outside the adapters prefix.

Design decisions:
- One queue for every request, streaming or not, whatever its adapter. The default engine
  batches continuously (ray_jobs.serve.continuous): requests join and leave the running batch
  between tokens, each row through its own adapter's stacked LoRA weights, so a replica never
  serialises adapters and never holds a new request until a batch ends. `serve.batching:
  mixed` keeps the static `@serve.batch` + PEFT `adapter_names=` engine (DoRA and
  modules_to_save adapters); Serve's multiplexing would split batches per adapter
  (`per_adapter`; benchmarks/serve_load.py --design compares all three).
- Overload is answered by the replica (ray_jobs.serve.admission): at most
  max_ongoing_requests + max_queued_requests held, beyond that an OpenAI-shaped 503 with
  Retry-After (Serve's proxy would answer in plain text); timeouts are ours too (504 JSON,
  and the row stops generating).
- Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) everywhere,
  including 404s for unknown routes, so OpenAI clients raise their usual exceptions.
- Every request leaves one metric update and one structured log record (ray_jobs.serve.metrics),
  without prompt or completion text unless serve.log_prompts is set.
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and
# FastAPI must resolve route annotations (Request) from real objects, not strings.

import asyncio
import json
import logging
import math
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_jobs.config import NAME_PATTERN, Recipe, load_recipe
from ray_jobs.serve.admission import Admission
from ray_jobs.serve.engine import AdapterLoadError, GenerationRequest, IncrementalDecoder
from ray_jobs.serve.metrics import BASE_TAG, RequestRecord, ServeMetrics, log_request
from ray_jobs.storage import Storage, adapter_prefix

log = logging.getLogger("ray.serve")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NAME_RE = re.compile(NAME_PATTERN)
DEFAULT_MAX_TOKENS = 128


# ---------------------------------------------------------------------- request schemas
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _parse(request: Request, schema: type[BaseModel]):
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        where = f"{param}: " if param else ""
        # The message names the field and the rule, never the value: values may hold PHI.
        raise APIError(422, f"{where}{first['msg']}", code="invalid_field", param=param) from None


def _read_keys(path: str | None) -> set[str]:
    if not path:
        return set()
    keys = {line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")}
    if not keys:
        raise ValueError(f"serve.api_keys_file {path} holds no keys")
    return keys


def _not_found(model: str) -> APIError:
    return APIError(404, f"model {model!r} not found; GET /v1/models lists what is served",
                    code="model_not_found", param="model")


# ---------------------------------------------------------------------- the app
api = FastAPI(title="medtune", description="OpenAI-compatible serving of medtune adapters")


@api.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error_response(error)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return error_response(APIError(error.status_code, str(error.detail), kind, code=kind))


def continuous_blockers(recipe: Recipe) -> list[str]:
    """What in the recipe's own adapters the continuous engine's LoRA bank cannot apply."""
    from ray_jobs.serve.lora_bank import unservable_fields

    return [f"lora.{key}" for key in unservable_fields(recipe.lora.model_dump())]


def _engine(model_dir: str, recipe: Recipe, on_adapter_event):
    """The generation engine serve.batching names. A recipe whose adapters the continuous engine
    cannot apply (DoRA, modules_to_save, trained biases), or a model whose KV cache has
    sliding-window or recurrent layers, gets PEFT's static mixed batches instead, with a log line."""
    from ray_jobs.serve.engine import HFEngine

    cfg, model_cfg = recipe.serve, recipe.model
    if cfg.batching == "continuous":
        from ray_jobs.serve.continuous import ContinuousEngine, UnsupportedModelError

        blockers = continuous_blockers(recipe)
        if blockers:
            log.warning("the recipe's adapters use %s, which the continuous engine cannot apply; "
                        "serving with static mixed batches (PEFT) instead", ", ".join(blockers))
        else:
            try:
                return ContinuousEngine(model_dir, model_cfg, cfg.max_loaded_adapters,
                                        on_adapter_event=on_adapter_event, max_batch_size=cfg.max_batch_size)
            except UnsupportedModelError as error:  # raised before any weights are loaded
                log.warning("%s; serving with static mixed batches instead", error)
    return HFEngine(model_dir, model_cfg, cfg.max_loaded_adapters, on_adapter_event=on_adapter_event,
                    batching="mixed" if cfg.batching == "continuous" else cfg.batching)


@serve.deployment(name="medtune", health_check_period_s=10)
@serve.ingress(api)
class MedtuneServer:
    """One replica: the base model in memory, adapters loaded on demand."""

    def __init__(self, recipe: dict[str, Any]):
        from ray_jobs.models import resolve_model_dir

        self.recipe = Recipe.model_validate(recipe)
        self.cfg = cfg = self.recipe.serve
        self.storage = Storage.from_uri(self.recipe.storage.root)
        self.metrics = ServeMetrics()
        model_dir = resolve_model_dir(self.recipe.model, self.storage)
        self.engine = _engine(model_dir, self.recipe, self.metrics.record_adapter_event)
        self.base_name = cfg.served_model_name or self.recipe.model.base
        self.api_keys = _read_keys(cfg.api_keys_file)
        self.admission = Admission(cfg.max_ongoing_requests + cfg.max_queued_requests,
                                   hold_s=cfg.request_timeout_s + 5)
        self.versions_cache: dict[str, tuple[float, list[str]]] = {}
        self.load_locks: dict[str, threading.Lock] = {}
        self.load_locks_guard = threading.Lock()
        self.generate_batch.set_max_batch_size(cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        for name in cfg.adapters:  # warm the configured adapters; a bad one must not stop the rest
            try:
                self._load(name)
            except APIError as error:
                log.warning("adapter %s not preloaded: %s", name, error.message)

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

    def _versions(self, name: str, refresh: bool = False) -> list[str]:
        """Complete versions of adapter `name`, re-read from storage at most every adapter_refresh_s."""
        cached = self.versions_cache.get(name)
        if cached and not refresh and time.monotonic() - cached[0] < self.cfg.adapter_refresh_s:
            return cached[1]
        versions = self.storage.complete_versions(adapter_prefix(name))
        self.versions_cache[name] = (time.monotonic(), versions)
        return versions

    def _resolve(self, model: str) -> tuple[str, str] | None:
        """The request's `model` as (adapter name, version); None for the base model.

        Raises:
            APIError: 400 for a name that is not a safe slug, 404 for an unknown one.
        """
        if model in (self.base_name, "base"):
            return None
        if ":" in model:  # Ray Serve LLM form: base:adapter
            base, _, model = model.rpartition(":")
            if base not in (self.base_name, "base"):
                raise _not_found(f"{base}:{model}")
        name, _, version = model.partition("@")
        if not NAME_RE.match(name) or (version and not VERSION_PATTERN.match(version)):
            raise APIError(400, "invalid model name: adapter names are lower-case letters, digits, '.', '_' "
                                "and '-', optionally followed by @version", code="invalid_model_name", param="model")
        versions = self._versions(name)
        if version and version not in versions:  # maybe published since the last listing
            versions = self._versions(name, refresh=True)
        if not versions:
            raise _not_found(model)
        version = version or versions[-1]
        if version not in versions:
            raise APIError(404, f"adapter {name} has no complete version {version!r}; versions: {versions}",
                           code="model_not_found", param="model")
        return name, version

    def _load(self, model: str) -> tuple[str | None, str | None, str, str | None]:
        """Resolve and load the model a request names: (adapter key, local path, metric tag, version)."""
        resolved = self._resolve(model)
        if resolved is None:
            return None, None, BASE_TAG, None
        name, version = resolved
        key = f"{name}@{version}"
        with self.load_locks_guard:
            lock = self.load_locks.setdefault(key, threading.Lock())
        with lock:  # one download and one load per adapter version, however many requests ask
            if key in self.engine.loaded:
                return key, self.engine.loaded[key], name, version
            from ray_jobs.models import cache_root, node_lock

            try:
                with node_lock(f"adapter-{name}-{version}"):  # replicas on one node share the cache
                    local = self.storage.local_view(adapter_prefix(name, version),
                                                    cache_root() / "adapters" / name / version)
                self.engine.ensure_adapter(key, str(local))
            except (AdapterLoadError, OSError) as error:
                log.warning("adapter %s failed to load: %s", key, error)
                raise APIError(500, f"adapter {key} could not be loaded: {error}", "server_error",
                               "adapter_load_failed", "model") from None
        return key, str(local), name, version

    def _prompt_ids(self, messages: list[dict[str, str]] | None, prompt: str | None) -> list[int]:
        tokenizer = self.engine.tokenizer
        if messages is not None:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:
                raise APIError(400, f"messages do not fit the model's chat template: {exc}", param="messages") from None
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(prompt)["input_ids"]

    def _max_tokens(self, body: _Sampling, prompt_tokens: int, chat: bool) -> int:
        context = self.engine.context_length
        asked = body.requested_tokens()
        if prompt_tokens >= context or (asked and prompt_tokens + asked > context):
            raise APIError(400, f"prompt ({prompt_tokens} tokens) plus max_tokens ({asked or 1}) exceeds the "
                                f"context length {context}", code="context_length_exceeded",
                           param="messages" if chat else "prompt")
        return asked or min(DEFAULT_MAX_TOKENS, context - prompt_tokens)

    def _finish_record(self, record: RequestRecord, started: float, request: GenerationRequest | None) -> None:
        record.latency_s = time.perf_counter() - started
        if request is not None and request.first_token_at is not None:
            record.ttft_s = request.first_token_at - started
        self.metrics.record_request(record)
        log_request(record, self.cfg.log_prompts)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, requests: list[GenerationRequest]):
        # One batch may mix adapters (and streams): the engine routes each row to its adapter.
        return await asyncio.to_thread(self.engine.generate, requests)

    async def _generate(self, request: GenerationRequest):
        """The request's result, from the continuous engine's queue or a static @serve.batch batch."""
        if hasattr(self.engine, "submit"):
            return await asyncio.wrap_future(self.engine.submit(request))
        return await self.generate_batch(request)

    async def _run(self, http_request: Request, chat: bool):
        """Answer one chat or completions request; every outcome leaves one metric and log record."""
        started = time.perf_counter()
        deadline = started + self.cfg.request_timeout_s
        record = RequestRecord(endpoint="chat" if chat else "completions")
        request: GenerationRequest | None = None
        streaming, place = False, None
        try:
            self._check_auth(http_request)
            place = self.admission.enter()
            if place is None:
                raise APIError(503, f"this replica already holds {self.admission.limit} requests "
                                    "(serve.max_ongoing_requests + serve.max_queued_requests); retry later",
                               "server_error", "overloaded", headers={"Retry-After": str(self.cfg.retry_after_s)})
            body = await _parse(http_request, ChatRequest if chat else CompletionRequest)
            messages = [m.model_dump() for m in body.messages] if chat else None
            prompt = None if chat else body.prompt
            record.stream = body.stream
            if self.cfg.log_prompts:
                record.prompt = messages if chat else prompt
            adapter, adapter_path, record.adapter, record.adapter_version = await asyncio.to_thread(
                self._load, body.model)
            prompt_ids = await asyncio.to_thread(self._prompt_ids, messages, prompt)
            record.prompt_tokens = len(prompt_ids)
            max_tokens = self._max_tokens(body, len(prompt_ids), chat)
            request = GenerationRequest(prompt_ids, adapter, max_tokens, body.temperature, body.top_p, body.seed,
                                        body.stops(), adapter_path=adapter_path)
            created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = self._sse(request, body.model, rid, created, chat, include_usage, record, started, deadline,
                                   place)
                streaming = True  # from here on the stream records the request when it ends
                return StreamingResponse(events, media_type="text/event-stream")
            try:
                result = await asyncio.wait_for(self._generate(request), timeout=deadline - time.perf_counter())
            except asyncio.TimeoutError:
                raise APIError(504, f"generation took longer than serve.request_timeout_s "
                                    f"({self.cfg.request_timeout_s:g}s)", "server_error", "timeout") from None
            record.completion_tokens, record.finish_reason = result.completion_tokens, result.finish_reason
            if self.cfg.log_prompts:
                record.completion = result.text
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
            if request is not None and not streaming:
                request.cancelled = True  # a timed-out or abandoned row stops generating
            if not streaming:
                self.admission.leave(place)
                self._finish_record(record, started, request)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": result.completion_tokens,
                 "total_tokens": len(prompt_ids) + result.completion_tokens}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [choice], "usage": usage}

    async def _sse(self, request: GenerationRequest, model: str, rid: str, created: int, chat: bool,
                   include_usage: bool, record: RequestRecord, started: float, deadline: float, place: object):
        """Server-sent events for one request, generated inside the shared batches."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        decoder = IncrementalDecoder(self.engine.tokenizer)
        request.on_token = lambda token: loop.call_soon_threadsafe(queue.put_nowait, token)
        timed_out = threading.Event()

        def time_out() -> None:
            timed_out.set()
            request.cancelled = True

        timer = loop.call_later(max(0.0, deadline - time.perf_counter()), time_out)
        held_back = max((len(s) for s in request.stop), default=1) - 1  # a stop string may be half emitted
        pending, emitted, finish, tokens = "", "", "length", 0

        def chunk(text: str | None, finish_reason: str | None = None) -> str:
            if chat:
                delta = {"content": text} if text is not None else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
            return _event({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]})

        try:
            batch = asyncio.ensure_future(self._generate(request))
            batch.add_done_callback(lambda _: queue.put_nowait(None))
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield _event({"id": rid, "object": kind, "created": created, "model": model, "choices": [first]})
            stopped = ended = False
            interval, last_sent = self.cfg.stream_interval_s, -math.inf
            while not ended:
                # Every token that arrived while the last chunk was on its way (or within
                # serve.stream_interval_s of it) goes in one chunk: each chunk costs the replica's
                # event loop, which competes with decoding once dozens of streams share a batch.
                arrived = [await queue.get()]
                if interval and arrived[0] is not None and (wait := last_sent + interval - loop.time()) > 0:
                    await asyncio.sleep(wait)
                while not queue.empty():
                    arrived.append(queue.get_nowait())
                ended = arrived[-1] is None
                for token in arrived[:-1] if ended else arrived:
                    if stopped:
                        break
                    tokens += 1
                    pending += decoder.push(token)
                    cut = min((pending.find(s) for s in request.stop if s in pending), default=-1)
                    if cut >= 0:
                        pending, finish, stopped = pending[:cut], "stop", True
                        request.cancelled = True  # the client has its answer; free the row
                safe = len(pending) if stopped else max(0, len(pending) - held_back)
                if safe:
                    emitted += pending[:safe]
                    yield chunk(pending[:safe])
                    pending, last_sent = pending[safe:], loop.time()
            result = batch.result()
            if pending:
                emitted += pending
                yield chunk(pending)
            if not stopped:
                finish = result.finish_reason
            if timed_out.is_set() and not stopped:
                record.status, record.error_code = 504, "timeout"
                error = APIError(504, f"generation took longer than serve.request_timeout_s "
                                      f"({self.cfg.request_timeout_s:g}s)", "server_error", "timeout")
                yield _event(error.body())
                yield "data: [DONE]\n\n"
                return
            record.completion_tokens, record.finish_reason = result.completion_tokens if not stopped else tokens, finish
            if self.cfg.log_prompts:
                record.completion = emitted
            yield chunk(None, finish)
            if include_usage:
                usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": record.completion_tokens,
                         "total_tokens": len(request.prompt_ids) + record.completion_tokens}
                yield _event({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                              "usage": usage})
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            record.status, record.error_code = 499, "client_closed"
            raise
        except Exception as exc:  # headers are sent: the error travels as an event, as OpenAI's do
            log.error("stream failed: %s", type(exc).__name__)
            record.status, record.error_code = 500, "internal_error"
            error = APIError(500, f"generation failed ({type(exc).__name__})", "server_error", "internal_error")
            yield _event(error.body())
            yield "data: [DONE]\n\n"
        finally:
            timer.cancel()
            self.admission.leave(place)
            request.cancelled = True
            self._finish_record(record, started, request)

    # ------------------------------------------------------------------ routes
    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "base_model": self.base_name, "loaded_adapters": list(self.engine.loaded),
                "adapter_load_seconds": self.engine.load_seconds, "device": self.engine.device}

    def _model_entries(self, name: str) -> list[dict[str, Any]]:
        entries = []
        versions = self._versions(name, refresh=True)
        for version in versions:
            entries.append({"id": f"{name}@{version}", "object": "model", "owned_by": "medtune",
                            "root": self.base_name, "parent": self.base_name})
        if versions:
            entries.append({"id": name, "object": "model", "owned_by": "medtune", "root": self.base_name,
                            "parent": self.base_name, "latest_version": versions[-1]})
        return entries

    @api.get("/v1/models")
    def models(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        data = [{"id": self.base_name, "object": "model", "owned_by": "medtune", "root": self.base_name}]
        for name in self.storage.listdir("adapters"):
            if NAME_RE.match(name):
                data.extend(self._model_entries(name))
        return {"object": "list", "data": data}

    @api.get("/v1/models/{model_id:path}")
    def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        resolved = self._resolve(model_id)
        if resolved is None:
            return {"id": self.base_name, "object": "model", "owned_by": "medtune", "root": self.base_name}
        name, version = resolved
        return {"id": model_id, "object": "model", "owned_by": "medtune", "root": self.base_name,
                "parent": self.base_name, "version": version}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._run(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._run(request, chat=False)


def routing_cap(admission_limit: int) -> int:
    """How many requests Serve may route to one replica, and queue: far more than a replica
    admits, so a burst's excess reaches the replica and is refused in JSON; Serve's proxy
    (plain-text 503) refuses only past that."""
    return max(1024, 4 * admission_limit)


def deployment_options(recipe: Recipe) -> dict[str, Any]:
    """Serve deployment options from serve.*: replicas, autoscaling, queue bound, JSON logs."""
    cfg = recipe.serve
    options: dict[str, Any] = dict(
        # Every request reaches a replica, which admits or refuses it itself (Admission): Serve's
        # own cap and router queue would refuse in plain text (and its queue fills for a moment
        # on any burst, while the router assigns replicas). Its backpressure stays as a last
        # resort with the same Retry-After.
        max_ongoing_requests=routing_cap(cfg.max_ongoing_requests + cfg.max_queued_requests),
        max_queued_requests=routing_cap(cfg.max_ongoing_requests + cfg.max_queued_requests),
        backpressure_config={"status_code": 503, "retry_after_s": cfg.retry_after_s},
        ray_actor_options={"num_gpus": cfg.gpus_per_replica, "num_cpus": cfg.cpus_per_replica},
        logging_config={"encoding": "JSON", "enable_access_log": True},
    )
    if cfg.max_replicas > cfg.min_replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        options["num_replicas"] = max(cfg.min_replicas, 1)
    return options


def build_app(recipe: Recipe):
    """The Serve application for a recipe, with its autoscaling and queue settings."""
    return MedtuneServer.options(**deployment_options(recipe)).bind(recipe.model_dump(mode="json"))


def app_builder(args: dict[str, str]):
    """Entry for `serve run ray_jobs.serve:app_builder recipe=PATH` and RayService configs."""
    overrides = [f"{k}={v}" for k, v in args.items() if k != "recipe"]
    return build_app(load_recipe(args["recipe"], overrides))


def start(recipe: Recipe, *, blocking: bool = False, app_name: str = "medtune"):
    """Start Serve's HTTP proxy on the recipe's host/port and deploy the app; returns its handle."""
    import ray

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": recipe.serve.host, "port": recipe.serve.port})
    return serve.run(build_app(recipe), name=app_name, route_prefix=recipe.serve.route_prefix, blocking=blocking)


def main(recipe: Recipe) -> None:
    print(f"[medtune] serving {recipe.model.base} and adapters from {recipe.storage.root} "
          f"on http://{recipe.serve.host}:{recipe.serve.port}", flush=True)
    start(recipe, blocking=True)

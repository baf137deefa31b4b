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
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and
# FastAPI must resolve route annotations (Request) from real objects, not strings.

import asyncio
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from ray_jobs.config import NAME_PATTERN, Recipe, load_recipe
from ray_jobs.serve.engine import AdapterLoadError, GenerationRequest
from ray_jobs.storage import COMPLETE_MARKER, Storage, adapter_prefix

log = logging.getLogger("medtune.serve")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NAME_RE = re.compile(NAME_PATTERN)


# ---------------------------------------------------------------------- request schemas
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


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
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 128


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


def error_response(error: APIError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


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
        param = ".".join(str(p) for p in first["loc"])
        raise APIError(422, f"{param}: {first['msg']}", code="invalid_field", param=param) from None


def _read_keys(path: str | None) -> set[str]:
    if not path:
        return set()
    keys = {line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")}
    if not keys:
        raise ValueError(f"serve.api_keys_file {path} holds no keys")
    return keys


# ---------------------------------------------------------------------- the app
api = FastAPI(title="medtune", description="OpenAI-compatible serving of medtune adapters")


@api.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error_response(error)


@serve.deployment(name="medtune", health_check_period_s=10)
@serve.ingress(api)
class MedtuneServer:
    """One replica: the base model in memory, adapters loaded on demand."""

    def __init__(self, recipe: dict[str, Any]):
        from ray_jobs.models import resolve_model_dir
        from ray_jobs.serve.engine import HFEngine

        self.recipe = Recipe.model_validate(recipe)
        self.storage = Storage.from_uri(self.recipe.storage.root)
        model_dir = resolve_model_dir(self.recipe.model, self.storage)
        cfg = self.recipe.serve
        self.engine = HFEngine(model_dir, self.recipe.model, cfg.max_loaded_adapters)
        self.base_name = self.recipe.model.base
        self.api_keys = _read_keys(cfg.api_keys_file)
        self.in_flight = 0
        self.generate_batch.set_max_batch_size(cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        for name in cfg.adapters:  # warm the configured adapters; a bad one must not stop the rest
            try:
                self._adapter_key(name)
            except APIError as error:
                log.warning("adapter %s not preloaded: %s", name, error.message)

    # ------------------------------------------------------------------ helpers
    def _check_auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if token not in self.api_keys:
            raise APIError(401, "missing or invalid API key", "authentication_error", "invalid_api_key")

    def _versions(self, name: str) -> list[str]:
        return self.storage.complete_versions(adapter_prefix(name))

    def _adapter_key(self, model: str) -> str | None:
        """Resolve the request's `model` to a loaded adapter key (None: the base model)."""
        if model in (self.base_name, "base"):
            return None
        if ":" in model:  # Ray Serve LLM form: base:adapter
            _, _, model = model.rpartition(":")
        name, _, version = model.partition("@")
        if not NAME_RE.match(name) or (version and not VERSION_PATTERN.match(version)):
            raise APIError(400, f"invalid model name {model!r}", code="invalid_model_name", param="model")
        versions = self._versions(name)
        if not versions:
            raise APIError(404, f"model {model!r} not found; GET /v1/models lists what is served",
                           code="model_not_found", param="model")
        version = version or versions[-1]
        if version not in versions:
            raise APIError(404, f"adapter {name} has no complete version {version!r}; versions: {versions}",
                           code="model_not_found", param="model")
        key = f"{name}@{version}"
        rel = adapter_prefix(name, version)
        from ray_jobs.models import cache_root

        local = self.storage.local_view(rel, cache_root() / "adapters" / name / version)
        try:
            self.engine.ensure_adapter(key, str(local))
        except AdapterLoadError as error:
            raise APIError(500, str(error), "server_error", "adapter_load_failed", "model") from None
        return key

    def _prompt_ids(self, messages: list[dict[str, str]] | None, prompt: str | None) -> list[int]:
        tokenizer = self.engine.tokenizer
        if messages is not None:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:
                raise APIError(400, f"messages do not fit the model's chat template: {exc}", param="messages") from None
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        return ids

    async def _admit(self) -> None:
        if self.in_flight >= self.recipe.serve.max_queued_requests:
            raise APIError(503, "server is at capacity; retry shortly", "server_error", "overloaded",
                           headers={"Retry-After": "1"})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, requests: list[GenerationRequest]):
        # One batch may mix adapters: the engine routes each row to its own adapter.
        return await asyncio.to_thread(self.engine.generate, requests)

    async def _run(self, body: _Sampling, messages: list[dict[str, str]] | None, prompt: str | None, chat: bool):
        await self._admit()
        adapter = await asyncio.to_thread(self._adapter_key, body.model)
        prompt_ids = await asyncio.to_thread(self._prompt_ids, messages, prompt)
        if len(prompt_ids) + body.limit() > self.engine.context_length:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({body.limit()}) exceeds the "
                                f"context length {self.engine.context_length}", code="context_length_exceeded",
                           param="messages" if chat else "prompt")
        request = GenerationRequest(prompt_ids, adapter, body.limit(), body.temperature, body.top_p, body.seed,
                                    body.stops())
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(self._sse(request, body.model, rid, created, chat), media_type="text/event-stream")
        self.in_flight += 1
        try:
            result = await asyncio.wait_for(self.generate_batch(request), timeout=self.recipe.serve.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, "generation timed out", "server_error", "timeout") from None
        finally:
            self.in_flight -= 1
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

    async def _sse(self, request: GenerationRequest, model: str, rid: str, created: int, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        self.in_flight += 1
        try:
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def pump() -> None:
                for piece in self.engine.stream(request):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
                loop.call_soon_threadsafe(queue.put_nowait, None)

            worker = loop.run_in_executor(None, pump)
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield _event({"id": rid, "object": kind, "created": created, "model": model, "choices": [first]})
            while (piece := await queue.get()) is not None:
                choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                          else {"index": 0, "text": piece, "finish_reason": None})
                yield _event({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]})
            await worker
            last = ({"index": 0, "delta": {}, "finish_reason": "stop"} if chat
                    else {"index": 0, "text": "", "finish_reason": "stop"})
            yield _event({"id": rid, "object": kind, "created": created, "model": model, "choices": [last]})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------------ routes
    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "base_model": self.base_name, "loaded_adapters": list(self.engine.loaded)}

    @api.get("/v1/models")
    def models(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        data = [{"id": self.base_name, "object": "model", "owned_by": "medtune", "root": self.base_name}]
        for name in self.storage.listdir("adapters"):
            if not NAME_RE.match(name):
                continue
            versions = self._versions(name)
            for version in versions:
                data.append({"id": f"{name}@{version}", "object": "model", "owned_by": "medtune",
                             "root": self.base_name, "parent": self.base_name})
            if versions:
                data.append({"id": name, "object": "model", "owned_by": "medtune", "root": self.base_name,
                             "parent": self.base_name})
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._check_auth(request)
        body = await _parse(request, ChatRequest)
        return await self._run(body, [m.model_dump() for m in body.messages], None, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._check_auth(request)
        body = await _parse(request, CompletionRequest)
        return await self._run(body, None, body.prompt, chat=False)


def build_app(recipe: Recipe):
    """The Serve application for a recipe, with its autoscaling and queue settings."""
    cfg = recipe.serve
    options: dict[str, Any] = dict(
        max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_gpus": cfg.gpus_per_replica, "num_cpus": 1},
    )
    if cfg.max_replicas > cfg.min_replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        options["num_replicas"] = max(cfg.min_replicas, 1)
    return MedtuneServer.options(**options).bind(recipe.model_dump(mode="json"))


def app_builder(args: dict[str, str]):
    """Entry for `serve run ray_jobs.serve:app_builder recipe=PATH` and RayService configs."""
    overrides = [f"{k}={v}" for k, v in args.items() if k != "recipe"]
    return build_app(load_recipe(args["recipe"], overrides))


def start(recipe: Recipe, *, blocking: bool = False):
    """Start Serve's HTTP proxy on the recipe's host/port and deploy the app."""
    import ray

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": recipe.serve.host, "port": recipe.serve.port})
    handle = serve.run(build_app(recipe), name="medtune", route_prefix=recipe.serve.route_prefix, blocking=blocking)
    return handle


def main(recipe: Recipe) -> None:
    print(f"[medtune] serving {recipe.model.base} and adapters from {recipe.storage.root} "
          f"on http://{recipe.serve.host}:{recipe.serve.port}", flush=True)
    start(recipe, blocking=True)

"""The OpenAI API as medtune serves it: request models, errors, and response bodies.

Requests are validated strictly, because a field accepted and then ignored is a silent wrong
answer: a field this server does not know is a 400 naming it, and an optional feature the
replica's engine does not honour (`Sampling.features`) is a 400 naming it too. Messages take
plain text or arrays of text parts, and the `developer` role (current OpenAI clients) is
applied as the system prompt. Error bodies have OpenAI's shape, so OpenAI clients raise their
usual exceptions; messages name fields and rules, never values, which may hold PHI.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_jobs.serve.engines.base import Delta, LogprobEntry


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def not_found(model: str) -> APIError:
    return APIError(
        404, f"model {model!r} not found; GET /v1/models lists what is served", code="model_not_found", param="model"
    )


# ---------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: str | list[dict[str, Any]]):
        if isinstance(content, list):
            for index, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise ValueError(f"part {index}: only text parts ({{'type': 'text', 'text': ...}}) are supported")
        return content

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it: text content, `developer` as `system`."""
        # Parts joined by newlines, as vLLM's OpenAI server does.
        text = self.content if isinstance(self.content, str) else "\n".join(p["text"] for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self

    def spec(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"schema": self.json_schema.schema_}}


class Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=16)
    user: str | None = Field(default=None, max_length=256)
    """Recorded in the request log as a hash only (the value may identify a person)."""
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False
    """vLLM's extension: generate max_tokens whatever the model says (load tests)."""

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, raw: Any) -> Any:
        # Some clients send every known field, unset ones as null: null means "not given".
        return {k: v for k, v in raw.items() if v is not None} if isinstance(raw, dict) else raw

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None):
        if isinstance(stop, list) and (len(stop) > 4 or not all(stop)):
            raise ValueError("at most 4 non-empty stop strings")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_count(self) -> int | None:
        raise NotImplementedError

    def features(self) -> dict[str, str]:
        """Optional features this request uses, {feature: the field that asks for it}."""
        used = {}
        if self.top_logprobs_count() is not None:
            used["logprobs"] = "logprobs"
        if self.response_format and self.response_format.type != "text":
            used["response_format"] = "response_format"
        for name in ("presence_penalty", "frequency_penalty", "ignore_eos"):
            if getattr(self, name):
                used[name] = name
        return used

    def user_hash(self) -> str | None:
        return hashlib.sha256(self.user.encode()).hexdigest()[:16] if self.user else None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        return [message.for_template() for message in self.messages]


class CompletionRequest(Sampling):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


def parse_request(raw: bytes, schema: type[Sampling]) -> Sampling:
    """The request body as `schema`; APIError 400 for JSON or unknown fields, 422 for bad values."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        where = f"{param}: " if param else ""
        if first["type"] == "extra_forbidden":
            raise APIError(
                400, f"{where}this server does not support this field", code="unsupported_field", param=param
            ) from None
        # The message names the field and the rule, never the value: values may hold PHI.
        raise APIError(422, f"{where}{first['msg']}", code="invalid_field", param=param) from None


def check_features(body: Sampling, engine_name: str, supported: frozenset[str]) -> None:
    """A 400 naming the first field whose feature the replica's engine does not honour."""
    for feature, field_name in body.features().items():
        if feature not in supported:
            raise APIError(
                400,
                f"{field_name}: not supported by this server's {engine_name} engine (serve.engine; vLLM supports it)",
                code="unsupported_field",
                param=field_name,
            )


# ---------------------------------------------------------------------- responses
def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _token_bytes(e.token),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, lp in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[LogprobEntry], offset: int = 0) -> dict[str, Any]:
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


class Answer:
    """One choice of a response, gathered from its engine deltas."""

    def __init__(self, index: int):
        self.index, self.text, self.tokens, self.finish_reason = index, "", 0, None
        self.logprobs: list[LogprobEntry] = []

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.tokens += delta.tokens
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason


def response_body(
    chat: bool, rid: str, created: int, model: str, answers: list[Answer], prompt_tokens: int, with_logprobs: bool
) -> dict[str, Any]:
    choices = []
    for answer in answers:
        if chat:
            choice = {
                "index": answer.index,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": answer.finish_reason,
                "logprobs": chat_logprobs(answer.logprobs) if with_logprobs else None,
            }
        else:
            choice = {
                "index": answer.index,
                "text": answer.text,
                "finish_reason": answer.finish_reason,
                "logprobs": completion_logprobs(answer.logprobs) if with_logprobs else None,
            }
        choices.append(choice)
    completion_tokens = sum(answer.tokens for answer in answers)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk_body(
    chat: bool,
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: Delta | None,
    with_logprobs: bool,
    role: bool = False,
) -> dict[str, Any]:
    """One streamed chunk: a delta's text (and logprobs), its finish reason, or the role opener."""
    finish = delta.finish_reason if delta else None
    if chat:
        content: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if delta is not None and (delta.text or not finish):
            content["content"] = delta.text
        choice = {
            "index": index,
            "delta": content,
            "finish_reason": finish,
            "logprobs": chat_logprobs(delta.logprobs) if with_logprobs and delta and delta.logprobs else None,
        }
    else:
        choice = {
            "index": index,
            "text": delta.text if delta else "",
            "finish_reason": finish,
            "logprobs": completion_logprobs(delta.logprobs) if with_logprobs and delta and delta.logprobs else None,
        }
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }

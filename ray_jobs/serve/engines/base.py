"""What every generation engine shares: the request it takes, the pieces it streams back, and
the protocol the app calls.

An engine takes token ids (the app applies the chat template, so every engine sees the same
prompt) and streams `Delta`s: new text, how many tokens it holds, their log-probabilities if
asked, and on the last one the finish reason. `supports` names the optional request features an
engine honours; the app refuses any other with a 400 that names the field, so a request is
never accepted and then silently handled differently.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

AdapterEvent = Callable[[str, str, float], None]
"""("load", "name@version", seconds) or ("evict", "name@version", 0.0): for metrics."""

FEATURES = frozenset({"logprobs", "ignore_eos", "response_format", "presence_penalty", "frequency_penalty"})
"""Optional request features; an engine lists the ones it honours in `supports`."""


class AdapterLoadError(RuntimeError):
    """An adapter exists but could not be loaded; only requests for it fail."""


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
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's and the k most likely ones'."""
    ignore_eos: bool = False
    """Keep generating past end of turn, up to max_tokens (load tests with random weights)."""
    response_format: dict[str, Any] | None = None
    """{"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    cancelled: bool = False
    """Set by the caller (timeout, client gone); the engine stops this row at the next token."""
    first_token_at: float | None = None
    """perf_counter() when the first new token of this row was produced (time to first token)."""
    on_token: Callable[[int, TokenLogprobs | None], None] | None = None
    """HF engines: called from the generating thread with each new token id of this row."""

    def sampling_key(self) -> tuple:
        # Greedy decoding ignores seed and top_p: such requests share one batch.
        return (0.0, 1.0, None) if self.temperature == 0 else (self.temperature, self.top_p, self.seed)


@dataclass
class TokenLogprobs:
    """One generated token's log-probability and the `top` most likely alternatives (token ids)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class LogprobEntry:
    """TokenLogprobs with the tokens as text: what the OpenAI response shows."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Delta:
    """A piece of one answer: new text, the tokens it took, and at the end the finish reason."""

    text: str = ""
    tokens: int = 0
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    """stop or length on an answer's last delta; None before."""


@dataclass
class GenerationResult:
    text: str
    completion_tokens: int
    finish_reason: str
    """stop, length, or cancelled."""
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class Engine(Protocol):
    """What the app needs from an engine. Two implement it: `HFEngineStreams` (transformers +
    PEFT, CPU or GPU) and `VLLMEngine`."""

    name: str
    device: str
    tokenizer: Any
    context_length: int
    supports: frozenset[str]
    load_seconds: dict[str, float]

    def loaded_adapters(self) -> list[str]: ...

    async def load_adapter(self, key: str, local_path: str) -> float:
        """Make adapter `key` servable (0.0 if it already is); AdapterLoadError if it cannot be."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The answer as it is generated; closing the iterator stops the generation."""


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
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict); reads every tensor: truncated files fail here, not in PEFT
                handle.get_tensor(name)
    except Exception as exc:
        raise AdapterLoadError(f"adapter_model.safetensors is unreadable: {type(exc).__name__}: {exc}") from None


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
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):  # nothing new, or half a character
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

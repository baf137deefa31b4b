"""Format adapters: one raw record of any seed format -> one canonical conversation.

The canonical form is a list of `{"role", "content"}` messages (system / user / assistant)
plus `meta`, the fields evaluation needs later (gold entities, SDTM step, QA category,
audience, final answer). Every stage after this one sees only that form.

Real datasets rename, capitalise and nest their fields, so a field is found by:
1. the recipe's `data.columns` mapping (canonical name -> dotted source path), else
2. a case- and punctuation-insensitive match against the canonical name and its aliases
   (`Question`, `complex_CoT`, `Complex-CoT` all find `complex_cot`), at the top level or
   one level down inside a nested mapping (`{"data": {"Question": ...}}`). An alias whose
   value is itself a mapping is such a container, not the field (`{"input": {"text": ...}}`
   finds `text` inside `input`); the canonical name holding a mapping is a wrong type.

A record that cannot be converted raises `RowRejected(reason)`; the pipeline quarantines it
with that reason instead of failing the job.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from ray_jobs.core.recipe import DataConfig

ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "instructions", "task", "prompt"),
    "input": ("input", "context", "inputs", "field_info"),
    "output": ("output", "response", "completion", "answer", "target"),
    "metadata": ("metadata", "meta", "info"),
    "question": ("question", "query", "prompt", "input", "instruction", "q"),
    "answer": ("answer", "response", "output", "completion", "a"),
    "category": ("category", "type", "kind", "label", "task_type"),
    "complex_cot": ("complex_cot", "cot", "chain_of_thought", "reasoning", "thinking", "rationale", "thoughts"),
    "response": ("response", "final_response", "answer", "final_answer", "output"),
    "text": ("text", "sentence", "document", "content", "body", "input", "passage"),
    "entities": ("entities", "entity", "annotations", "ner", "labels", "spans"),
    "messages": ("messages", "conversations", "conversation", "dialog", "dialogue", "chat", "turns"),
}
ENTITY_LABEL_KEYS = ("label", "type", "entity_type", "entitytype", "category", "tag", "entity_label")
ENTITY_TEXT_KEYS = ("text", "value", "span", "entity", "mention", "word", "entity_text")
ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "patient": "user",
    "question": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "ai": "assistant",
    "doctor": "assistant",
    "answer": "assistant",
}
ROLE_KEYS = ("role", "from", "speaker", "author")
CONTENT_KEYS = ("content", "value", "text", "message", "utterance")
STRUCTURED_FIELDS = {"metadata", "entities", "messages"}
"""Fields whose value may be a mapping; every other field is text."""

REQUIRED_FIELDS = {
    "instruction": ("instruction", "output"),
    "qa": ("question", "answer"),
    "reasoning": ("question", "complex_cot", "response"),
    "entities": ("text", "entities"),
    "chat": ("messages",),
    "text": ("text",),
}
OPTIONAL_FIELDS = {
    "instruction": ("input", "metadata"),
    "qa": ("category",),
    "reasoning": (),
    "entities": (),
    "chat": (),
    "text": (),
}


class RowRejected(Exception):
    """A record that cannot be used; `reason` is a short machine-readable code."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_NOT_ALNUM = re.compile(r"[^a-z0-9]")


@functools.lru_cache(maxsize=4096)  # field names repeat on every row: ~5% of the per-row cost uncached
def _squash(name: str) -> str:
    return _NOT_ALNUM.sub("", name.lower())


@functools.lru_cache(maxsize=1024)
def _squashed_keys(keys: tuple[str, ...]) -> dict[str, str]:
    """Squashed name -> key, for a mapping's keys: rows of a dataset share their keys, so this
    is built once per shape of row, not once per row (it was a tenth of the format adapter's
    cost). The caller must not change the dict."""
    return {_squash(k): k for k in keys}


@functools.lru_cache(maxsize=256)
def _candidates(name: str) -> tuple[str, ...]:
    return tuple(_squash(a) for a in ALIASES.get(name, (name,)))


def _lookup_path(record: dict[str, Any], dotted: str) -> Any:
    node: Any = record
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict):  # tolerate case differences in explicit paths too
            match = _squashed_keys(tuple(node)).get(_squash(part))
            if match is None:
                return None
            node = node[match]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _find_field(record: dict[str, Any], name: str, columns: dict[str, str], taken: set[str]) -> Any:
    if name in columns:
        return _lookup_path(record, columns[name])
    levels = [record] + [v for v in record.values() if isinstance(v, dict)]
    for level in levels:
        squashed = _squashed_keys(tuple(level))
        for candidate in _candidates(name):
            key = squashed.get(candidate)
            if key is None or (id(level), key) in taken:
                continue
            if isinstance(level[key], dict) and name not in STRUCTURED_FIELDS and candidate != _squash(name):
                continue  # a container: its own keys are searched as the next level
            taken.add((id(level), key))
            return level[key]
    return None


def extract_fields(record: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    """Pull the format's fields out of a raw record (canonical name -> value)."""
    found: dict[str, Any] = {}
    taken: set = set()  # one source key feeds one field ("input" is both an alias and a field)
    fields = REQUIRED_FIELDS[data.format] + OPTIONAL_FIELDS[data.format]
    # Exact canonical names win over aliases: match those first.
    for name in sorted(fields, key=lambda n: n not in record):
        value = _find_field(record, name, data.columns, taken)
        if value is None and name in REQUIRED_FIELDS[data.format]:
            raise RowRejected(f"missing_field:{name}")
        found[name] = value
    return found


def _text(value: Any, name: str, *, required: bool = True) -> str:
    if value is None:
        if required:
            raise RowRejected(f"missing_field:{name}")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowRejected(f"wrong_type:{name}")
    if required and not value.strip():
        raise RowRejected(f"empty_field:{name}")
    return value


_ENTITY_LABEL_KEYS = tuple(map(_squash, ENTITY_LABEL_KEYS))
_ENTITY_TEXT_KEYS = tuple(map(_squash, ENTITY_TEXT_KEYS))


def normalize_entities(value: Any, unique: bool) -> list[dict[str, str]]:
    """Entities as [{label, text}] from lists of dicts, JSON strings or [label, text] pairs."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowRejected("wrong_type:entities") from None
    if isinstance(value, dict):
        value = value.get("entities", value.get("Entities"))
    if not isinstance(value, list):
        raise RowRejected("wrong_type:entities")
    entities, seen = [], set()
    for item in value:
        if isinstance(item, dict):
            keys = _squashed_keys(tuple(item))
            label = next((item[keys[k]] for k in _ENTITY_LABEL_KEYS if k in keys), None)
            text = next((item[keys[k]] for k in _ENTITY_TEXT_KEYS if k in keys), None)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            label, text = item
        else:
            raise RowRejected("wrong_type:entities")
        if not isinstance(label, str) or not isinstance(text, str) or not label.strip() or not text.strip():
            raise RowRejected("bad_entity")
        entity = {"label": label.strip(), "text": text.strip()}
        key = (entity["label"], entity["text"])
        if unique and key in seen:
            continue
        seen.add(key)
        entities.append(entity)
    return entities


def entities_answer(entities: list[dict[str, str]]) -> str:
    """The assistant turn for an entity-extraction row: compact, stable JSON."""
    return json.dumps({"entities": entities}, ensure_ascii=False)


def _system_prompt(record: dict[str, Any], data: DataConfig, meta: dict[str, Any]) -> str | None:
    parts = [data.system_prompt] if data.system_prompt else []
    if data.audience is not None:
        value = _lookup_path(record, data.audience.field) if data.audience.field else None
        audience = str(value).strip().lower() if value is not None else ""
        prompts = {k.lower(): v for k, v in data.audience.prompts.items()}
        if audience not in prompts:
            if data.audience.default is None:
                raise RowRejected("unknown_audience")
            audience = data.audience.default.lower()
        meta["audience"] = audience
        parts.append(prompts[audience])
    # An audience may add nothing (the Elara seed's "general" users): skip empty prompts.
    return " ".join(p.strip() for p in parts if p.strip()) or None


def _chat_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowRejected("wrong_type:messages") from None
    if not isinstance(value, list) or not value:
        raise RowRejected("wrong_type:messages")
    messages = []
    for turn in value:
        if not isinstance(turn, dict):
            raise RowRejected("wrong_type:messages")
        keys = _squashed_keys(tuple(turn))
        role = next((turn[keys[k]] for k in ROLE_KEYS if k in keys), None)
        content = next((turn[keys[k]] for k in CONTENT_KEYS if k in keys), None)
        role = ROLE_NAMES.get(str(role).strip().lower()) if role is not None else None
        if role is None:
            raise RowRejected("unknown_role")
        messages.append({"role": role, "content": _text(content, "content")})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowRejected("no_assistant_turn")
    return messages


def to_conversation(record: Any, data: DataConfig) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Convert one raw record to (messages, meta), or raise RowRejected."""
    if not isinstance(record, dict):
        raise RowRejected("not_an_object")
    fields = extract_fields(record, data)
    meta: dict[str, Any] = {}
    fmt = data.format
    if fmt == "text":
        return [{"role": "assistant", "content": _text(fields["text"], "text")}], meta
    if fmt == "chat":
        messages = _chat_messages(fields["messages"])
        system = _system_prompt(record, data, meta)
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        meta["reference"] = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        return messages, meta

    if fmt == "instruction":
        instruction = _text(fields["instruction"], "instruction")
        extra = _text(fields.get("input"), "input", required=False)
        answer = _text(fields["output"], "output")
        metadata = fields.get("metadata")
        if isinstance(metadata, str):
            try:
                metadata = json.loads(metadata)
            except json.JSONDecodeError:
                metadata = None
        if isinstance(metadata, dict):
            meta.update({k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))})
        if data.instruction_role == "system":
            system, user = instruction, extra or instruction
        else:
            system, user = None, f"{instruction}\n\n{extra}" if extra.strip() else instruction
    elif fmt == "qa":
        user = _text(fields["question"], "question")
        answer = _text(fields["answer"], "answer")
        system = None
        if fields.get("category") is not None:
            meta["category"] = str(fields["category"]).strip().lower()
    elif fmt == "reasoning":
        user = _text(fields["question"], "question")
        final = _text(fields["response"], "response")
        cot = _text(fields["complex_cot"], "complex_cot")
        answer = data.reasoning_template.format(cot=cot.strip(), response=final.strip())
        meta["final_response"] = final.strip()
        system = None
    elif fmt == "entities":
        user = _text(fields["text"], "text")
        entities = normalize_entities(fields["entities"], data.unique_entities)
        lowered = user.lower()
        if any(e["text"].lower() not in lowered for e in entities):
            raise RowRejected("entity_not_in_text")
        meta["entities"] = entities
        answer = entities_answer(entities)
        system = None
    else:  # pragma: no cover - the config schema admits no other format
        raise ValueError(f"unknown format {fmt}")

    base_system = _system_prompt(record, data, meta)
    system = " ".join(p for p in (system, base_system) if p) or None
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    meta["reference"] = answer
    return messages, meta

"""Chat-template tokenisation with prompt masking, and packing into fixed-length rows.

Masking works with any model's own chat template, not a per-family list of markers: the
conversation is rendered once in full, and for each assistant turn the template is also
rendered up to that turn (with the generation prompt) and through it. Their difference is
the assistant's span in characters; tokens whose characters fall inside a span keep their
label, all others get -100. The span includes the template's end-of-turn token, so the
model learns to stop. For the last turn, "through it" is the full rendering, so a
single-turn row costs two renderings, not three.

A batch of conversations is tokenised in one fast-tokenizer call, and labels come from the
tokens' character offsets with numpy: per-call and per-token Python overhead was most of the
stage's cost (benchmarks/README.md, "Preprocessing profile"). For byte-level BPE tokenizers
the offsets are summed from the tokens' byte lengths (`ByteLevelLengths`) instead of asked of
the tokenizer, which nearly doubles what the ids alone cost.

Packing concatenates documents into rows of exactly `max_seq_len` tokens (the last row of
a batch may be shorter) and restarts `position_ids` at 0 for every document. Transformers
derives a block-diagonal attention mask from restarting position ids (flash-attention
varlen, or SDPA/flex with a document mask), so packed documents never attend to each other.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Any

import numpy as np

from ray_jobs.core.modeling import IGNORE_INDEX
from ray_jobs.preprocess.formats import RowRejected


class ChatRenderer:
    """The tokenizer's chat template rendered to text: what `apply_chat_template(tokenize=False)`
    returns for plain `{"role", "content"}` string messages, without its per-call work (template
    lookup, message normalisation and a sanitising deep copy of every message: 60% of its cost
    per call, measured). The template is the one transformers compiles, in its sandbox, with the
    same variables (the special tokens), so the text is the same (`test_formats_tokenize.py`
    compares both for every tiny template). Where transformers' compiler is not importable or the
    tokenizer has no usable template, it calls `apply_chat_template`, which raises the error."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.compiled = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data

            self.compiled = _compile_jinja_template(tokenizer.get_chat_template())
            self.variables = _plain_template_data(dict(tokenizer.special_tokens_map))
        except (ImportError, ValueError, TypeError, AttributeError):
            self.compiled = None  # apply_chat_template raises or handles it, row by row

    def __call__(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self.compiled is None or not all(type(m.get("content")) is str and len(m) == 2 for m in messages):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return self.compiled.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.variables
        )


def render_with_spans(
    tokenizer: Any, messages: list[dict[str, str]], render: ChatRenderer | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered conversation and the character spans of its assistant turns."""
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        # Raw text (continued pre-training): no template, the whole text is the target.
        text = messages[0]["content"]
        return text, [(0, len(text))]
    render = render or ChatRenderer(tokenizer)
    try:
        full = render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = render(messages[:index], add_generation_prompt=True)
            last = index == len(messages) - 1
            through = full if last else render(messages[: index + 1])
            if not full.startswith(through) or not through.startswith(prompt):
                # Templates that rewrite history (e.g. drop earlier reasoning) break prefix
                # rendering; masking would be wrong, so the row is quarantined, not guessed.
                raise RowRejected("template_not_prefix_stable")
            spans.append((len(prompt), len(through)))
    except RowRejected:
        raise
    except Exception as exc:  # templates raise on roles they do not support
        raise RowRejected(f"template_error:{type(exc).__name__}") from None
    return full, spans


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    max_seq_len: int,
    truncation: str,
    train_on_inputs: bool,
    add_eos_to_text: bool = True,
    min_tokens: int = 0,
    max_tokens: int | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation, raising RowRejected when unusable.

    `min_tokens` / `max_tokens` (data.clean) are length filters on the whole rendered
    conversation, checked before truncation: a row outside them is quarantined as
    `too_few_tokens` / `too_many_tokens` even when `truncation` would have cut it to fit.
    """
    (result,) = tokenize_conversations(
        tokenizer,
        [messages],
        max_seq_len=max_seq_len,
        truncation=truncation,
        train_on_inputs=train_on_inputs,
        add_eos_to_text=add_eos_to_text,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
    )
    if isinstance(result, RowRejected):
        raise result
    ids, labels = result
    return ids.tolist(), labels.tolist()


def tokenize_conversations(
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    max_seq_len: int,
    truncation: str,
    train_on_inputs: bool,
    add_eos_to_text: bool = True,
    min_tokens: int = 0,
    max_tokens: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray] | RowRejected]:
    """`tokenize_conversation` for a batch: per conversation, (input_ids, labels) as int32
    arrays, or the RowRejected that says why it is unusable."""
    results: list[Any] = [None] * len(conversations)
    rendered: dict[bool, list[tuple[int, str, list[tuple[int, int]]]]] = {False: [], True: []}
    render = ChatRenderer(tokenizer)
    for index, messages in enumerate(conversations):
        try:
            text, spans = render_with_spans(tokenizer, messages, render)
        except RowRejected as rejected:
            results[index] = rejected
            continue
        is_raw_text = len(messages) == 1 and messages[0]["role"] == "assistant"
        rendered[is_raw_text].append((index, text, spans))
    for is_raw_text, items in rendered.items():
        if not items:
            continue
        # Raw text gets the tokenizer's BOS; a rendered template already holds its own.
        encoded = _encode([text for _, text, _ in items], tokenizer, add_special_tokens=is_raw_text)
        for (index, _, spans), (ids, offsets) in zip(items, encoded):
            results[index] = _labelled(
                tokenizer,
                ids,
                offsets,
                spans,
                is_raw_text=is_raw_text,
                max_seq_len=max_seq_len,
                truncation=truncation,
                train_on_inputs=train_on_inputs,
                add_eos_to_text=add_eos_to_text,
                min_tokens=min_tokens,
                max_tokens=max_tokens,
            )
    return results


def _encode(texts: list[str], tokenizer: Any, add_special_tokens: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, character offsets) per text. A fast tokenizer's Rust backend is called directly:
    transformers' conversion of each encoding back to Python lists cost as much as the
    tokenisation itself, and these are the same ids and offsets."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        lengths = None if add_special_tokens else byte_level_lengths(tokenizer)
        if lengths is not None:
            return lengths.encode(backend, texts)
        return _with_offsets(backend, texts, add_special_tokens)
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return [_arrays(ids, offsets) for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"])]


def _arrays(ids: list[int], offsets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def _with_offsets(
    backend: Any, texts: list[str], add_special_tokens: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, character offsets) per text, both as the Rust tokenizer reports them."""
    return [_arrays(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


class ByteLevelLengths:
    """Character offsets of a byte-level BPE tokenizer's tokens from their lengths in bytes.

    Asking the Rust tokenizer for offsets cost 41 us a row in Rust and 23 us more to turn them
    into Python tuples, against 74 us for the ids alone (`encode_batch_fast`; one thread, entity
    rows, benchmarks/README.md). In a byte-level BPE with no normaliser, the tokens' bytes are
    the text's UTF-8 bytes in order, so each token's span is a running sum of byte lengths
    mapped to characters, which is what the tokenizer reports (a token that starts or ends
    inside a character covers the whole character).

    Guarded three ways: only tokenizers whose configuration allows it (`byte_level_lengths`);
    per text, the byte lengths must add up to the text's and every token's length must be known
    (an unknown token, which stands for any number of bytes, is not), else that text gets the
    tokenizer's own ids and offsets; and the first batch in each process is also encoded with
    offsets and compared (on any difference this process stops using the lengths, and says so
    once). Only the first batch is compared: later texts rely on the first two guards.
    """

    def __init__(self, lengths: np.ndarray, nfc: bool = False):
        self.lengths = lengths
        self.nfc = nfc  # the tokenizer NFC-normalises: the same text only when it is NFC already
        self.checked = False
        self.usable = True

    def encode(self, backend: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        if not self.usable:
            return _with_offsets(backend, texts)
        out = []
        for text, encoding in zip(texts, backend.encode_batch_fast(texts, add_special_tokens=False)):
            ids = np.asarray(encoding.ids, dtype=np.int32)
            offsets = self.offsets(text, ids)
            if offsets is None:
                ((ids, offsets),) = _with_offsets(backend, [text])
            out.append((ids, offsets))
        if not self.checked:
            self.checked = True
            exact = _with_offsets(backend, texts)
            if any(not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])) for a, b in zip(out, exact)):
                import logging

                logging.getLogger(__name__).warning(
                    "token offsets from byte lengths differ from the tokenizer's own; using the tokenizer's"
                )
                self.usable = False
                return exact
        return out

    def offsets(self, text: str, ids: np.ndarray) -> np.ndarray | None:
        """(n, 2) character offsets of `ids` in `text`, or None when their bytes are not the text's."""
        if len(ids) and int(ids.max()) >= len(self.lengths):
            return None
        if self.nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
            return None
        lengths = self.lengths[ids]
        ends = np.cumsum(lengths)
        data = text.encode("utf-8")
        if (ends[-1] if len(ends) else 0) != len(data) or not lengths.all():  # 0: a length not known
            return None
        starts = ends - lengths
        if not text.isascii():
            # The character of each byte: continuation bytes (10xxxxxx) belong to the one before.
            char_of_byte = np.cumsum((np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80) - 1
            starts, ends = char_of_byte[starts], char_of_byte[ends - 1] + 1
        return np.stack([starts, ends], axis=1)


@functools.lru_cache(maxsize=8)
def byte_level_lengths(tokenizer: Any) -> ByteLevelLengths | None:
    """ByteLevelLengths for `tokenizer` when its configuration keeps every token's bytes in the
    text as they are: byte-level BPE without byte fallback, no normaliser but NFC (Qwen's; the
    cleaned text is NFC already), no prefix space, no offset trimming, and added tokens matched
    as written (no stripping), no BPE dropout. Otherwise None. Cached per tokenizer object: one
    whose pipeline is changed after its first use keeps what was worked out then."""
    import json

    backend = tokenizer.backend_tokenizer
    if getattr(backend, "encode_batch_fast", None) is None:
        return None
    config = json.loads(backend.to_str())
    model = config.get("model") or {}
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    post = config.get("post_processor") or {"type": "TemplateProcessing"}  # none: nothing added
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    if (
        (config.get("normalizer") or {}).get("type", "NFC") != "NFC"
        or model.get("type") != "BPE"
        or model.get("byte_fallback")
        or model.get("dropout")  # the same text may give other tokens on the next call
        or not any(step.get("type") == "ByteLevel" for step in steps)
        or any(step.get("type") not in ("ByteLevel", "Split") for step in steps)
        or any(step.get("type") == "ByteLevel" and step.get("add_prefix_space") for step in steps)
        or any(p.get("type") == "ByteLevel" and p.get("trim_offsets") for p in processors)
        or any(p.get("type") not in ("ByteLevel", "TemplateProcessing") for p in processors)
        or any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in config.get("added_tokens", []))
    ):
        return None
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    vocab: dict[str, int] = model.get("vocab") or {}
    nfc = config.get("normalizer") is not None
    # Under NFC a normalised added token is matched in its NFC form: not known (0) unless that
    # is the content as written.
    added = {
        t["id"]: len(t["content"].encode("utf-8"))
        if not (nfc and t.get("normalized") and not unicodedata.is_normalized("NFC", t["content"]))
        else 0
        for t in config.get("added_tokens", [])
    }
    lengths = np.zeros(max([*vocab.values(), *added, -1]) + 1, dtype=np.int64)  # 0: not known
    for token, token_id in vocab.items():
        if alphabet.issuperset(token):
            lengths[token_id] = len(token)  # one character of the byte-level alphabet per byte
    for token_id, length in added.items():
        lengths[token_id] = length
    if model.get("unk_token") in vocab:  # one unknown token may stand for any number of bytes
        lengths[vocab[model["unk_token"]]] = 0
    return ByteLevelLengths(lengths, nfc=nfc)


def _labelled(
    tokenizer: Any,
    ids: np.ndarray,
    offsets: np.ndarray,
    spans: list[tuple[int, int]],
    *,
    is_raw_text: bool,
    max_seq_len: int,
    truncation: str,
    train_on_inputs: bool,
    add_eos_to_text: bool,
    min_tokens: int,
    max_tokens: int | None,
) -> tuple[np.ndarray, np.ndarray] | RowRejected:
    if train_on_inputs:
        labels = ids.copy()
    else:
        starts, ends = offsets[:, 0], offsets[:, 1]
        inside = np.zeros(len(ids), dtype=bool)
        for span_start, span_end in spans:
            inside |= (starts >= span_start) & (starts < span_end)
        labels = np.where(inside & (ends > starts), ids, IGNORE_INDEX).astype(np.int32)
    if is_raw_text and add_eos_to_text and tokenizer.eos_token_id is not None:
        ids = np.append(ids, np.int32(tokenizer.eos_token_id))
        labels = np.append(labels, np.int32(tokenizer.eos_token_id))
    if not (labels != IGNORE_INDEX).any():
        return RowRejected("no_target_tokens")
    if len(ids) < min_tokens:
        return RowRejected("too_few_tokens")
    if max_tokens is not None and len(ids) > max_tokens:
        return RowRejected("too_many_tokens")
    if len(ids) > max_seq_len:
        if truncation == "reject":
            return RowRejected("too_long_tokens")
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if not (labels != IGNORE_INDEX).any():
            return RowRejected("no_target_tokens_after_truncation")
    return ids, labels


def pack_documents(docs: list[tuple[list[int], list[int]]], max_seq_len: int) -> list[dict[str, Any]]:
    """Pack (input_ids, labels) documents into rows of at most `max_seq_len` tokens.

    First-fit in arrival order over the documents given (a Ray Data batch): each document
    goes into the first row with room. Not first-fit *decreasing*: sorting by length fills
    each row with documents of one length, and similar length usually means the same kind of
    example, so every step trained on one kind at a time. In a tiny-model experiment
    (held-out entity F1, 400 steps, one seed each) FFD reached 0.48 and first-fit 0.95, for
    1.3% more rows. First-fit still leaves at most one row less than half full.
    Each row carries `position_ids` restarting per document and `seq_lens` (document lengths
    in order), so training can rebuild the document boundaries either way.
    """
    bins: list[list[int]] = []
    space: list[int] = []
    for index in range(len(docs)):
        length = len(docs[index][0])
        target = next((b for b, free in enumerate(space) if free >= length), None)
        if target is None:
            bins.append([index])
            space.append(max_seq_len - length)
        else:
            bins[target].append(index)
            space[target] -= length
    rows = []
    for members in bins:  # indices in input order: each row keeps its documents' arrival order
        input_ids = np.concatenate([np.asarray(docs[i][0], dtype=np.int32) for i in members])
        labels = np.concatenate([np.asarray(docs[i][1], dtype=np.int32) for i in members])
        seq_lens = [len(docs[i][0]) for i in members]
        position_ids = np.concatenate([np.arange(n, dtype=np.int32) for n in seq_lens])
        rows.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "position_ids": position_ids,
                "seq_lens": np.asarray(seq_lens, dtype=np.int32),
            }
        )
    return rows


def unpacked_row(ids: list[int], labels: list[int]) -> dict[str, Any]:
    return {
        "input_ids": np.asarray(ids, dtype=np.int32),
        "labels": np.asarray(labels, dtype=np.int32),
        "position_ids": np.arange(len(ids), dtype=np.int32),
        "seq_lens": np.asarray([len(ids)], dtype=np.int32),
    }

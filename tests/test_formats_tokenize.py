"""Format adapters and tokenisation: raw seed records -> conversations -> masked, packed tokens.

The records come from the seed projects' own documentation (SDTM instruction tuning, medical
Q&A, medical-o1 reasoning, Unsloth entity extraction, audience-specific adapters). The
masking tests check the one property training depends on: the tokens that carry labels
decode to exactly the assistant turns plus the end-of-turn marker, in every template family.
"""

from __future__ import annotations

import json
import unicodedata
from itertools import accumulate
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ray_jobs.core.recipe import AudienceConfig, DataConfig
from ray_jobs.preprocess.formats import RowRejected, normalize_entities, to_conversation
from ray_jobs.preprocess.tokenize import (
    IGNORE_INDEX,
    ByteLevelLengths,
    ChatRenderer,
    byte_level_lengths,
    pack_documents,
    tokenize_conversation,
    unpacked_row,
)
from ray_jobs.tiny_model import TEMPLATES

ENTITY_PROMPT = (
    "You are a medical entity extractor from clinical texts. Extract the entities from the "
    "text and return them in a structured JSON format."
)


def data_config(fmt: str, **fields) -> DataConfig:
    return DataConfig(format=fmt, train=["unit.jsonl"], **fields)


def rejected(record, config: DataConfig) -> str:
    with pytest.raises(RowRejected) as caught:
        to_conversation(record, config)
    return caught.value.reason


# --------------------------------------------------------------------------- instruction (SDTM seed)
SDTM_ROW = {
    "instruction": "You are an SDTM annotation assistant. Select the SDTM domain for the CRF field.",
    "input": "Field label: Adverse event term\nForm: Adverse Events",
    "output": "Domain: AE",
    "metadata": {"step": "domain_selection", "domain": "AE", "pattern": "direct", "field_label": "Adverse event term"},
}


def test_sdtm_rows_make_the_instruction_the_system_prompt_when_asked():
    messages, meta = to_conversation(SDTM_ROW, data_config("instruction", instruction_role="system"))
    assert messages == [
        {"role": "system", "content": SDTM_ROW["instruction"]},
        {"role": "user", "content": SDTM_ROW["input"]},
        {"role": "assistant", "content": "Domain: AE"},
    ]
    assert meta["step"] == "domain_selection"
    assert meta["domain"] == "AE"
    assert meta["pattern"] == "direct"
    assert meta["reference"] == "Domain: AE"


def test_alpaca_rows_join_instruction_and_input_into_the_user_turn():
    messages, _ = to_conversation(SDTM_ROW, data_config("instruction"))
    assert messages == [
        {"role": "user", "content": f"{SDTM_ROW['instruction']}\n\n{SDTM_ROW['input']}"},
        {"role": "assistant", "content": "Domain: AE"},
    ]


def test_an_instruction_row_without_input_uses_the_instruction_alone():
    row = {"instruction": "List three SDTM domains.", "input": "", "output": "AE, VS, CM"}
    messages, _ = to_conversation(row, data_config("instruction"))
    assert messages[0] == {"role": "user", "content": "List three SDTM domains."}


def test_instruction_metadata_may_arrive_as_a_json_string():
    row = {**SDTM_ROW, "metadata": json.dumps(SDTM_ROW["metadata"])}
    _, meta = to_conversation(row, data_config("instruction", instruction_role="system"))
    assert (meta["step"], meta["domain"], meta["pattern"]) == ("domain_selection", "AE", "direct")


# --------------------------------------------------------------------------- qa (medical Q&A seed)
def test_qa_rows_keep_their_category_for_evaluation():
    row = {
        "question": "What are the side effects of ibuprofen?",
        "answer": "Nausea, heartburn and, rarely, stomach bleeding.",
        "category": " Drug Information ",
    }
    messages, meta = to_conversation(row, data_config("qa", system_prompt="You are a helpful medical assistant."))
    assert messages == [
        {"role": "system", "content": "You are a helpful medical assistant."},
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": row["answer"]},
    ]
    assert meta["category"] == "drug information"


def test_qa_rows_without_category_have_none():
    _, meta = to_conversation({"question": "Q?", "answer": "A."}, data_config("qa"))
    assert "category" not in meta


# --------------------------------------------------------------------------- reasoning (medical-o1 seed)
REASONING_ROW = {
    "question": "A 45-year-old presents with fever and productive cough. Most likely diagnosis?",
    "complex_cot": "Fever plus productive cough suggests a lower respiratory infection.",
    "response": "The most likely diagnosis is pneumonia. Recommend a chest X-ray.",
}
REASONING_ANSWER = f"## Thinking\n\n{REASONING_ROW['complex_cot']}\n\n## Final Response\n\n{REASONING_ROW['response']}"


def test_reasoning_rows_become_thinking_then_final_response():
    messages, meta = to_conversation(REASONING_ROW, data_config("reasoning"))
    assert messages == [
        {"role": "user", "content": REASONING_ROW["question"]},
        {"role": "assistant", "content": REASONING_ANSWER},
    ]
    assert meta["final_response"] == REASONING_ROW["response"]


def test_the_reasoning_template_is_configurable():
    config = data_config("reasoning", reasoning_template="<think>{cot}</think>{response}")
    messages, _ = to_conversation(REASONING_ROW, config)
    assert messages[-1]["content"] == f"<think>{REASONING_ROW['complex_cot']}</think>{REASONING_ROW['response']}"


@pytest.mark.parametrize(
    "record",
    [
        {
            "Question": REASONING_ROW["question"],
            "Complex_CoT": REASONING_ROW["complex_cot"],
            "Response": REASONING_ROW["response"],
        },
        {
            "QUESTION": REASONING_ROW["question"],
            "complex-cot": REASONING_ROW["complex_cot"],
            "final_response": REASONING_ROW["response"],
        },
        {
            "data": {
                "question": REASONING_ROW["question"],
                "complex_cot": REASONING_ROW["complex_cot"],
                "response": REASONING_ROW["response"],
            },
            "source": "medical-o1",
        },
        {
            "prompt": REASONING_ROW["question"],
            "chain_of_thought": REASONING_ROW["complex_cot"],
            "answer": REASONING_ROW["response"],
        },
    ],
    ids=["capitalised", "punctuation", "nested", "aliases"],
)
def test_renamed_capitalised_and_nested_fields_are_found(record: dict):
    messages, _ = to_conversation(record, data_config("reasoning"))
    assert messages == [
        {"role": "user", "content": REASONING_ROW["question"]},
        {"role": "assistant", "content": REASONING_ANSWER},
    ]


def test_an_explicit_column_mapping_follows_dotted_paths():
    record = {
        "payload": {
            "Patient_Question": REASONING_ROW["question"],
            "steps": [REASONING_ROW["complex_cot"], "ignored second step"],
        },
        "final": REASONING_ROW["response"],
        "question": "a decoy the mapping overrides",
    }
    config = data_config(
        "reasoning",
        columns={"question": "payload.patient_question", "complex_cot": "payload.steps.0", "response": "final"},
    )
    messages, _ = to_conversation(record, config)
    assert messages == [
        {"role": "user", "content": REASONING_ROW["question"]},
        {"role": "assistant", "content": REASONING_ANSWER},
    ]


def test_a_column_mapping_to_a_missing_path_rejects_the_row():
    config = data_config("reasoning", columns={"question": "payload.nope"})
    assert rejected({**REASONING_ROW, "payload": {}}, config) == "missing_field:question"


# --------------------------------------------------------------------------- entities (Unsloth seed)
def test_entity_rows_become_a_json_answer_of_their_entities():
    row = {
        "text": "Prescribed metformin 500mg twice daily.",
        "entities": [
            {"label": "Medication", "text": "metformin"},
            {"label": "Dosage", "text": "500mg"},
            {"label": "Frequency", "text": "twice daily"},
        ],
    }
    messages, meta = to_conversation(row, data_config("entities", system_prompt=ENTITY_PROMPT))
    assert messages == [
        {"role": "system", "content": ENTITY_PROMPT},
        {"role": "user", "content": row["text"]},
        {"role": "assistant", "content": json.dumps({"entities": row["entities"]})},
    ]
    assert meta["entities"] == row["entities"]


def test_repeated_entities_are_listed_once_when_unique_entities_is_on():
    row = {
        "text": "The patient has diabetes mellitus; diabetes mellitus is poorly controlled.",
        "entities": [
            {"label": "Disease", "text": "diabetes mellitus"},
            {"label": "Disease", "text": "diabetes mellitus"},
        ],
    }
    _, unique = to_conversation(row, data_config("entities"))
    _, repeated = to_conversation(row, data_config("entities", unique_entities=False))
    assert unique["entities"] == [{"label": "Disease", "text": "diabetes mellitus"}]
    assert len(repeated["entities"]) == 2


def test_an_entity_missing_from_the_text_rejects_the_row():
    row = {"text": "The patient has diabetes mellitus.", "entities": [{"label": "Medication", "text": "metformin"}]}
    assert rejected(row, data_config("entities")) == "entity_not_in_text"


def test_entity_matching_ignores_case():
    row = {"text": "Diabetes Mellitus, type 2.", "entities": [{"label": "Disease", "text": "diabetes mellitus"}]}
    _, meta = to_conversation(row, data_config("entities"))
    assert meta["entities"] == [{"label": "Disease", "text": "diabetes mellitus"}]


@pytest.mark.parametrize(
    "value",
    [
        [{"label": "Disease", "text": "asthma"}],
        '[{"label": "Disease", "text": "asthma"}]',
        {"entities": [{"label": "Disease", "text": "asthma"}]},
        [{"Type": "Disease", "Value": " asthma "}],
        [["Disease", "asthma"]],
    ],
    ids=["dicts", "json-string", "wrapped", "other-keys", "pairs"],
)
def test_entity_lists_are_normalised_from_common_shapes(value):
    assert normalize_entities(value, unique=True) == [{"label": "Disease", "text": "asthma"}]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("not json", "wrong_type:entities"),
        (42, "wrong_type:entities"),
        (["asthma"], "wrong_type:entities"),
        ([{"label": "Disease", "text": ""}], "bad_entity"),
        ([{"label": "", "text": "asthma"}], "bad_entity"),
    ],
)
def test_malformed_entity_lists_are_rejected(value, reason: str):
    with pytest.raises(RowRejected) as caught:
        normalize_entities(value, unique=True)
    assert caught.value.reason == reason


# --------------------------------------------------------------------------- chat
def test_sharegpt_conversations_map_from_and_value_to_roles():
    row = {
        "conversations": [
            {"from": "human", "value": "I have a headache and fever."},
            {"from": "gpt", "value": "How long have you had these symptoms?"},
            {"from": "human", "value": "Two days."},
            {"from": "gpt", "value": "Please see a doctor if the fever exceeds 39 C."},
        ]
    }
    messages, meta = to_conversation(row, data_config("chat", system_prompt="You are a careful triage nurse."))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "You are a careful triage nurse."
    assert [m["content"] for m in messages[1:]] == [turn["value"] for turn in row["conversations"]]
    assert meta["reference"] == "Please see a doctor if the fever exceeds 39 C."


def test_openai_style_messages_pass_through():
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Dose of aspirin?"},
            {"role": "assistant", "content": "Ask your doctor."},
        ]
    }
    messages, _ = to_conversation(row, data_config("chat", system_prompt="Ignored: the row has its own."))
    assert messages == row["messages"]


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}], "unknown_role"),
        ([{"from": "human", "value": "Anyone there?"}], "no_assistant_turn"),
        ([], "wrong_type:messages"),
        ("not json", "wrong_type:messages"),
        ([{"from": "human", "value": "  "}, {"from": "gpt", "value": "y"}], "empty_field:content"),
    ],
)
def test_unusable_conversations_are_rejected(turns, reason: str):
    assert rejected({"conversations": turns}, data_config("chat")) == reason


# --------------------------------------------------------------------------- text
def test_text_rows_are_one_assistant_document():
    messages, meta = to_conversation({"body": "Hypertension is a chronic condition."}, data_config("text"))
    assert messages == [{"role": "assistant", "content": "Hypertension is a chronic condition."}]
    assert meta == {}


# --------------------------------------------------------------------------- audiences (Elara seed)
AUDIENCES = AudienceConfig(
    prompts={
        "doctor": "You are communicating with a medical professional, so use appropriate technical terminology.",
        "patient": "You are communicating with a patient, so use patient-friendly language.",
    }
)


def test_each_audience_gets_its_own_system_prompt():
    row = {"question": "What is hypertension?", "answer": "High blood pressure.", "audience": "Doctor"}
    config = data_config("qa", system_prompt="You are Elara, a professional medical AI assistant.", audience=AUDIENCES)
    messages, meta = to_conversation(row, config)
    assert messages[0] == {
        "role": "system",
        "content": "You are Elara, a professional medical AI assistant. " + AUDIENCES.prompts["doctor"],
    }
    assert meta["audience"] == "doctor"


def test_an_unknown_audience_is_rejected_without_a_default():
    row = {"question": "What is hypertension?", "answer": "High blood pressure.", "audience": "lawyer"}
    assert rejected(row, data_config("qa", audience=AUDIENCES)) == "unknown_audience"
    assert (
        rejected({k: v for k, v in row.items() if k != "audience"}, data_config("qa", audience=AUDIENCES))
        == "unknown_audience"
    )


def test_an_unknown_or_missing_audience_falls_back_to_the_default():
    config = data_config("qa", audience=AudienceConfig(prompts=AUDIENCES.prompts, default="patient"))
    for row in ({"question": "Q?", "answer": "A.", "audience": "lawyer"}, {"question": "Q?", "answer": "A."}):
        messages, meta = to_conversation(row, config)
        assert messages[0] == {"role": "system", "content": AUDIENCES.prompts["patient"]}
        assert meta["audience"] == "patient"


# --------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize(
    ("fmt", "record", "reason"),
    [
        ("qa", {"answer": "A."}, "missing_field:question"),
        ("qa", {"question": "Q?", "answer": None}, "missing_field:answer"),
        ("qa", {"question": ["Q?"], "answer": "A."}, "wrong_type:question"),
        ("qa", {"question": {"text": "Q?"}, "answer": "A."}, "wrong_type:question"),
        ("qa", {"question": "Q?", "answer": "   "}, "empty_field:answer"),
        ("reasoning", {"question": "Q?", "response": "R."}, "missing_field:complex_cot"),
        ("reasoning", {"question": "Q?", "complex_cot": "", "response": "R."}, "empty_field:complex_cot"),
        ("instruction", {"instruction": "Do X.", "input": "in"}, "missing_field:output"),
        ("instruction", {"instruction": "Do X.", "input": ["a"], "output": "Done."}, "wrong_type:input"),
        ("entities", {"entities": []}, "missing_field:text"),
        ("entities", {"text": "", "entities": []}, "empty_field:text"),
        ("text", {"text": True}, "wrong_type:text"),
        ("qa", ["Q?", "A."], "not_an_object"),
    ],
)
def test_bad_rows_are_rejected_with_a_reason(fmt: str, record, reason: str):
    assert rejected(record, data_config(fmt)) == reason


def test_numbers_are_accepted_as_text():
    messages, _ = to_conversation({"question": "Normal adult heart rate, bpm?", "answer": 72}, data_config("qa"))
    assert messages[-1]["content"] == "72"


# --------------------------------------------------------------------------- masking
CONVERSATION = [
    {"role": "system", "content": "You are a medical entity extractor."},
    {"role": "user", "content": "The patient has diabetes mellitus."},
    {"role": "assistant", "content": '{"entities": [{"label": "Disease", "text": "diabetes mellitus"}]}'},
    {"role": "user", "content": "Prescribed metformin 500mg twice daily."},
    {"role": "assistant", "content": '{"entities": [{"label": "Medication", "text": "metformin"}]}'},
]
ASSISTANT_TEXTS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
PROMPT_TEXTS = [m["content"] for m in CONVERSATION if m["role"] != "assistant"]


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def family(request: pytest.FixtureRequest, tiny_tokenizers: dict[str, Path]):
    """(template name, tokenizer) for each chat template family."""
    return request.param, AutoTokenizer.from_pretrained(tiny_tokenizers[request.param])


def labelled_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded text of each maximal run of tokens that carry a label."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token  # a label is the token itself (shifted by the model)
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_only_assistant_turns_and_their_end_of_turn_marker_carry_labels(family):
    template, tokenizer = family
    ids, labels = tokenize_conversation(
        tokenizer, CONVERSATION, max_seq_len=4096, truncation="reject", train_on_inputs=False
    )
    eot = TEMPLATES[template].eos
    runs = labelled_runs(tokenizer, ids, labels)
    # One run per assistant turn: exactly its content and the end-of-turn token (whitespace
    # a template puts around them, such as ChatML's trailing newline, is the only extra).
    assert [run.strip() for run in runs] == [text + eot for text in ASSISTANT_TEXTS]
    learned = "".join(runs)
    for prompt_text in PROMPT_TEXTS:
        assert prompt_text not in learned
    # And nothing of the conversation is lost: the full sequence holds every turn.
    full = tokenizer.decode(ids)
    for message in CONVERSATION:
        assert message["content"] in full


def test_the_direct_renderer_writes_what_apply_chat_template_writes(family):
    _, tokenizer = family
    render = ChatRenderer(tokenizer)
    assert render.compiled is not None  # the fast path, not the fallback, is what is compared
    for end in range(1, len(CONVERSATION) + 1):
        for generation_prompt in (False, True):
            expected = tokenizer.apply_chat_template(
                CONVERSATION[:end], tokenize=False, add_generation_prompt=generation_prompt
            )
            assert render(CONVERSATION[:end], add_generation_prompt=generation_prompt) == expected


def test_train_on_inputs_labels_every_token(family):
    _, tokenizer = family
    ids, labels = tokenize_conversation(
        tokenizer, CONVERSATION, max_seq_len=4096, truncation="reject", train_on_inputs=True
    )
    assert labels == ids


# Texts whose bytes and characters differ, whose tokens split characters, or that hold the
# templates' special tokens, besides the rendered conversation.
AWKWARD_TEXTS = [
    "Café au lait spots, naïve T-cells — résumé of Sjögren's: ≥ 5 mg/dL, 37.5 °C.",
    "患者は糖尿病です。Patient 🙂👩‍⚕️ reports pain 7/10\u200b today.\r\n\tTab and  two  spaces\n\n\n",
    "Ω≈ç√∫˜µ≤≥÷ combining: e\u0301 a\u0308 — Ａｒｔｈｕｒ",
    " leading space, trailing space ",
    "",
]


def test_offsets_from_byte_lengths_are_the_tokenizers_own(family):
    _, tokenizer = family
    lengths = byte_level_lengths(tokenizer)
    assert lengths is not None  # every tiny tokenizer is byte-level BPE: the fast path is what is compared
    specials = " ".join(tokenizer.all_special_tokens)
    texts = [*AWKWARD_TEXTS, specials + " " + AWKWARD_TEXTS[1], ChatRenderer(tokenizer)(CONVERSATION)]
    backend = tokenizer.backend_tokenizer
    exact = backend.encode_batch(texts, add_special_tokens=False)
    assert [(ids.tolist(), offsets.tolist()) for ids, offsets in lengths.encode(backend, texts)] == [
        (e.ids, [list(pair) for pair in e.offsets]) for e in exact
    ]
    # Every text took the fast path, except one that is not NFC where the tokenizer (Qwen's)
    # NFC-normalises: its offsets came from the tokenizer.
    from_lengths = [
        lengths.offsets(text, np.asarray(e.ids, dtype=np.int32)) is not None for text, e in zip(texts, exact)
    ]
    assert from_lengths == [not (lengths.nfc and not unicodedata.is_normalized("NFC", text)) for text in texts]
    assert lengths.usable


def test_byte_length_offsets_give_way_to_the_tokenizers_own_when_they_cannot_be_trusted(family):
    _, tokenizer = family
    backend = tokenizer.backend_tokenizer
    text = AWKWARD_TEXTS[0]
    (exact,) = backend.encode_batch([text], add_special_tokens=False)
    ids = np.asarray(exact.ids, dtype=np.int32)
    # Bytes that do not add up to the text's: no offsets from lengths for that text.
    assert ByteLevelLengths(byte_level_lengths(tokenizer).lengths + 1).offsets(text, ids) is None
    # Lengths that add up but are wrong, token by token: the first batch's check finds it, and
    # this batch and every later one get the tokenizer's own offsets.
    wrong = byte_level_lengths(tokenizer).lengths.copy()
    once = [int(i) for i in ids if (ids == i).sum() == 1]  # so that the total stays the same
    longer = next(i for i in once if wrong[i] > 1)
    other = next(i for i in once if i != longer)
    wrong[longer] -= 1
    wrong[other] += 1
    lengths = ByteLevelLengths(wrong)
    for _ in range(2):
        (encoded,) = lengths.encode(backend, [text])
        assert encoded[1].tolist() == [list(pair) for pair in exact.offsets]
    assert not lengths.usable


def _trained_byte_level(corpus: list[str], **bpe) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(**bpe))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [bpe["unk_token"]] if "unk_token" in bpe else []
    alphabet = [] if "unk_token" in bpe else pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


@pytest.mark.parametrize(
    "case",
    ["one unknown token for a run of unknown bytes", "added tokens matched in their NFC form"],
)
def test_byte_length_offsets_are_the_tokenizers_own_where_a_token_has_no_fixed_length(case: str):
    # Found in review: both cases add up to the text's bytes, so only the lengths can be wrong.
    if case.startswith("one unknown"):
        backend = _trained_byte_level(["hello world abc"] * 5, unk_token="<unk>", fuse_unk=True)
        text = "zzzzzz abc zzzz"  # 6 unknown bytes, then 4: "<unk>" twice
    else:
        backend = _trained_byte_level(["hello world"])
        backend.normalizer = normalizers.NFC()
        # ANGSTROM SIGN and DEVANAGARI QA are matched as their NFC forms, of other lengths.
        backend.add_tokens([AddedToken("\u212b", normalized=True), AddedToken("\u0958", normalized=True)])
        text = "\u00c5\u00c5\u00c5\u0915\u093c tail"
    lengths = byte_level_lengths(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert lengths is not None
    lengths.encode(backend, ["hello world"])  # the first batch, checked and passed
    (exact,) = backend.encode_batch([text], add_special_tokens=False)
    ((ids, offsets),) = lengths.encode(backend, [text])
    assert (ids.tolist(), offsets.tolist()) == (exact.ids, [list(pair) for pair in exact.offsets])


def test_tokenizers_that_change_the_text_get_their_own_offsets(tiny_tokenizers: dict[str, Path]):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizers["llama3"])
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()
    assert byte_level_lengths(tokenizer) is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizers["llama3"])
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    assert byte_level_lengths(tokenizer) is None


def test_a_template_error_rejects_the_row(tiny_tokenizers: dict[str, Path]):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizers["mistral"])
    # Mistral's template has no system role after the first message.
    messages = [CONVERSATION[1], CONVERSATION[0], CONVERSATION[2]]
    with pytest.raises(RowRejected) as caught:
        tokenize_conversation(tokenizer, messages, max_seq_len=4096, truncation="reject", train_on_inputs=False)
    assert caught.value.reason.startswith("template_error:")


def test_raw_text_is_all_target_and_ends_with_eos(tiny_llama_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "Hypertension is a chronic condition of raised blood pressure."
    ids, labels = tokenize_conversation(
        tokenizer,
        [{"role": "assistant", "content": text}],
        max_seq_len=4096,
        truncation="reject",
        train_on_inputs=False,
    )
    assert labels == ids
    assert ids[-1] == tokenizer.eos_token_id
    assert text in tokenizer.decode(ids)


# --------------------------------------------------------------------------- truncation
LONG_ANSWER = [
    {"role": "user", "content": "Summarise the note."},
    {"role": "assistant", "content": "The patient has diabetes mellitus and hypertension. " * 8},
]


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_an_overlong_conversation_is_rejected_by_default(llama_tokenizer):
    full_ids, _ = tokenize_conversation(
        llama_tokenizer, LONG_ANSWER, max_seq_len=4096, truncation="reject", train_on_inputs=False
    )
    with pytest.raises(RowRejected) as caught:
        tokenize_conversation(
            llama_tokenizer, LONG_ANSWER, max_seq_len=len(full_ids) - 1, truncation="reject", train_on_inputs=False
        )
    assert caught.value.reason == "too_long_tokens"
    exact, _ = tokenize_conversation(
        llama_tokenizer, LONG_ANSWER, max_seq_len=len(full_ids), truncation="reject", train_on_inputs=False
    )
    assert exact == full_ids  # exactly max_seq_len tokens still fits


def test_truncation_keeps_the_first_max_seq_len_tokens_and_their_labels(llama_tokenizer):
    full_ids, full_labels = tokenize_conversation(
        llama_tokenizer, LONG_ANSWER, max_seq_len=4096, truncation="reject", train_on_inputs=False
    )
    limit = len(full_ids) - 10
    ids, labels = tokenize_conversation(
        llama_tokenizer, LONG_ANSWER, max_seq_len=limit, truncation="truncate", train_on_inputs=False
    )
    assert (ids, labels) == (full_ids[:limit], full_labels[:limit])
    assert any(label != IGNORE_INDEX for label in labels)


def test_truncation_that_cuts_every_target_token_rejects_the_row(llama_tokenizer):
    _, full_labels = tokenize_conversation(
        llama_tokenizer, LONG_ANSWER, max_seq_len=4096, truncation="reject", train_on_inputs=False
    )
    prompt_length = next(i for i, label in enumerate(full_labels) if label != IGNORE_INDEX)
    with pytest.raises(RowRejected) as caught:
        tokenize_conversation(
            llama_tokenizer, LONG_ANSWER, max_seq_len=prompt_length, truncation="truncate", train_on_inputs=False
        )
    assert caught.value.reason == "no_target_tokens_after_truncation"


# --------------------------------------------------------------------------- packing
def make_documents(lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    """Documents whose tokens say which document they belong to (doc i holds 1000*i + position)."""
    docs = []
    for doc, length in enumerate(lengths):
        ids = [1000 * doc + position for position in range(length)]
        labels = [IGNORE_INDEX if position < 2 else token for position, token in enumerate(ids)]
        docs.append((ids, labels))
    return docs


def split_row(row: dict) -> list[tuple[list[int], list[int]]]:
    pieces, start = [], 0
    for length in row["seq_lens"].tolist():
        pieces.append(
            (row["input_ids"][start : start + length].tolist(), row["labels"][start : start + length].tolist())
        )
        start += length
    return pieces


@pytest.mark.parametrize("lengths", [[5, 9, 3, 7, 2, 8, 12, 1, 6], [12], [1] * 30, [11, 11, 11]])
def test_packing_keeps_every_document_whole_and_apart(lengths: list[int]):
    max_seq_len = 12
    docs = make_documents(lengths)
    rows = pack_documents(docs, max_seq_len)

    unpacked = []
    for row in rows:
        length = len(row["input_ids"])
        assert length <= max_seq_len
        assert len(row["labels"]) == len(row["position_ids"]) == length
        assert int(row["seq_lens"].sum()) == length
        starts = set(accumulate([0, *row["seq_lens"].tolist()[:-1]]))
        for position, value in enumerate(row["position_ids"].tolist()):
            # Position ids restart at 0 exactly where a document starts, and count up inside it.
            assert (value == 0) == (position in starts)
        pieces = split_row(row)
        assert all(ids[0] % 1000 == 0 for ids, _ in pieces)  # each piece starts at its document's start
        unpacked.extend(pieces)
    # Every document appears exactly once, unchanged, labels included.
    assert sorted(unpacked) == sorted(docs)
    # Little padding: no two rows could have been packed into one.
    sizes = [len(row["input_ids"]) for row in rows]
    assert all(a + b > max_seq_len for i, a in enumerate(sizes) for b in sizes[i + 1 :])


def test_packing_restarts_positions_within_each_document():
    rows = pack_documents(make_documents([3, 4]), max_seq_len=12)
    assert len(rows) == 1
    assert rows[0]["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert rows[0]["seq_lens"].tolist() == [3, 4]


def test_an_unpacked_row_is_one_document():
    row = unpacked_row([7, 8, 9], [IGNORE_INDEX, 8, 9])
    assert row["position_ids"].tolist() == [0, 1, 2]
    assert row["seq_lens"].tolist() == [3]
    assert row["labels"].tolist() == [IGNORE_INDEX, 8, 9]


# --------------------------------------------------------------------------- token-length filters
def test_token_length_filters_quarantine_rows_outside_min_and_max_tokens(llama_tokenizer):
    full_ids, _ = tokenize_conversation(
        llama_tokenizer, LONG_ANSWER, max_seq_len=4096, truncation="reject", train_on_inputs=False
    )
    n = len(full_ids)
    for min_tokens, max_tokens, reason in ((n + 1, None, "too_few_tokens"), (0, n - 1, "too_many_tokens")):
        with pytest.raises(RowRejected) as caught:
            tokenize_conversation(
                llama_tokenizer,
                LONG_ANSWER,
                max_seq_len=4096,
                truncation="reject",
                train_on_inputs=False,
                min_tokens=min_tokens,
                max_tokens=max_tokens,
            )
        assert caught.value.reason == reason
    exact, _ = tokenize_conversation(
        llama_tokenizer,
        LONG_ANSWER,
        max_seq_len=4096,
        truncation="reject",
        train_on_inputs=False,
        min_tokens=n,
        max_tokens=n,
    )
    assert exact == full_ids  # both bounds are inclusive


def test_max_tokens_is_checked_before_truncation(llama_tokenizer):
    # truncate cuts rows a little over max_seq_len; max_tokens still quarantines the giants.
    full_ids, _ = tokenize_conversation(
        llama_tokenizer, LONG_ANSWER, max_seq_len=4096, truncation="reject", train_on_inputs=False
    )
    limit = len(full_ids) - 10
    ids, _ = tokenize_conversation(
        llama_tokenizer,
        LONG_ANSWER,
        max_seq_len=limit,
        truncation="truncate",
        train_on_inputs=False,
        max_tokens=len(full_ids),
    )
    assert ids == full_ids[:limit]
    with pytest.raises(RowRejected) as caught:
        tokenize_conversation(
            llama_tokenizer,
            LONG_ANSWER,
            max_seq_len=limit,
            truncation="truncate",
            train_on_inputs=False,
            max_tokens=len(full_ids) - 1,
        )
    assert caught.value.reason == "too_many_tokens"


def test_max_tokens_below_min_tokens_is_a_config_error():
    with pytest.raises(ValueError, match=r"max_tokens \(10\) is below min_tokens \(20\)"):
        data_config("qa", clean={"min_tokens": 20, "max_tokens": 10})


# --------------------------------------------------------------------------- real-world field names
@pytest.mark.parametrize(
    ("record", "columns"),
    [
        ({"Text": "Asthma is a chronic disease."}, {}),
        ({"input": {"text": "Asthma is a chronic disease."}, "id": 7}, {}),
        ({"data": {"Document": "Asthma is a chronic disease."}}, {}),
        ({"record": {"body": {"value": "Asthma is a chronic disease."}}}, {"text": "record.body.value"}),
    ],
    ids=["capitalised", "alias-holding-a-mapping", "nested-alias", "mapped-two-levels-down"],
)
def test_text_is_found_under_real_world_field_names(record: dict, columns: dict):
    messages, _ = to_conversation(record, data_config("text", columns=columns))
    assert messages == [{"role": "assistant", "content": "Asthma is a chronic disease."}]


def test_qa_fields_nested_under_renamed_keys_need_a_column_mapping():
    record = {"input": {"text": "What is gout?"}, "output": {"text": "A form of inflammatory arthritis."}}
    # Without a mapping nothing says which nested text is the question: the row is refused...
    assert rejected(record, data_config("qa")) == "missing_field:question"
    # ...and `data.columns` says it.
    messages, _ = to_conversation(
        record, data_config("qa", columns={"question": "input.text", "answer": "output.text"})
    )
    assert [m["content"] for m in messages] == ["What is gout?", "A form of inflammatory arthritis."]


# --------------------------------------------------------------------------- the seeds' own examples
# Rows exactly as the seed projects document them (../shared/seeds), with the configuration
# each seed's own formatting code implies, and the assistant turn it trains on.
MEDICAL_PIPELINE_ROWS = [  # qa, with the categories of the medical AI pipeline seed
    (
        {
            "question": "What are the side effects of ibuprofen?",
            "answer": "Common side effects include nausea.",
            "category": "Drug Information",
        },
        "drug information",
    ),
    (
        {
            "question": "Can you prescribe me oxycodone?",
            "answer": "I can't prescribe medication; please see a licensed clinician.",
            "category": "Safety Refusal",
        },
        "safety refusal",
    ),
    (
        {
            "question": "I have crushing chest pain spreading to my arm.",
            "answer": "Call emergency services now.",
            "category": "Emergency Escalation",
        },
        "emergency escalation",
    ),
]
ELARA_BASE = (
    "You are Elara, a professional medical AI assistant trained to provide accurate, "
    "evidence-based information. Answer with compassion and clarity."
)
ELARA_AUDIENCES = AudienceConfig(
    field="user_type",
    default="general",
    prompts={
        "general": "",
        "doctor": "You are communicating with a medical professional, so use appropriate technical terminology.",
        "patient": "You are communicating with a patient, so use patient-friendly language and avoid excessive "
        "medical jargon.",
    },
)
SEED_EXAMPLES = {
    "sdtm-instruction": (
        {
            "instruction": "System prompt describing the task",
            "input": "User prompt with field information",
            "output": "Expected model response",
            "metadata": {
                "step": "domain_selection",
                "domain": "AE",
                "pattern": "direct",
                "field_label": "Original field label",
            },
        },
        data_config("instruction", instruction_role="system"),
        "Expected model response",
    ),
    "medical-o1-reasoning": (
        {"question": "Medical question...", "complex_cot": "Step-by-step reasoning...", "response": "Final answer..."},
        data_config("reasoning"),
        "## Thinking\n\nStep-by-step reasoning...\n\n## Final Response\n\nFinal answer...",
    ),
    "unsloth-entities": (
        {"text": "The patient has diabetes mellitus.", "entities": [{"label": "Disease", "text": "diabetes mellitus"}]},
        data_config("entities", system_prompt=ENTITY_PROMPT),
        '{"entities": [{"label": "Disease", "text": "diabetes mellitus"}]}',
    ),
    "elara-audience": (
        {"question": "What is hypertension?", "answer": "Persistently raised blood pressure.", "user_type": "patient"},
        data_config("qa", system_prompt=ELARA_BASE, audience=ELARA_AUDIENCES),
        "Persistently raised blood pressure.",
    ),
    "medical-pipeline-qa": (MEDICAL_PIPELINE_ROWS[1][0], data_config("qa"), MEDICAL_PIPELINE_ROWS[1][0]["answer"]),
}


@pytest.mark.parametrize("seed", sorted(SEED_EXAMPLES))
def test_each_seed_example_trains_on_exactly_its_answer(seed: str, llama_tokenizer):
    record, config, answer = SEED_EXAMPLES[seed]
    messages, _ = to_conversation(record, config)
    assert messages[-1] == {"role": "assistant", "content": answer}
    ids, labels = tokenize_conversation(
        llama_tokenizer, messages, max_seq_len=4096, truncation="reject", train_on_inputs=False
    )
    assert labelled_runs(llama_tokenizer, ids, labels) == [answer + "<|eot_id|>"]


@pytest.mark.parametrize(("record", "category"), MEDICAL_PIPELINE_ROWS)
def test_medical_pipeline_categories_survive_for_evaluation(record: dict, category: str):
    _, meta = to_conversation(record, data_config("qa"))
    assert meta["category"] == category


@pytest.mark.parametrize(
    ("user_type", "system"),
    [
        ("general", ELARA_BASE),
        ("doctor", f"{ELARA_BASE} {ELARA_AUDIENCES.prompts['doctor']}"),
        ("patient", f"{ELARA_BASE} {ELARA_AUDIENCES.prompts['patient']}"),
        (None, ELARA_BASE),
    ],
)
def test_elara_user_types_get_the_seeds_system_prompts(user_type: str | None, system: str):
    # The seed appends nothing for "general" users: no trailing space, no empty sentence.
    row = {"question": "What is hypertension?", "answer": "Raised blood pressure.", "user_type": user_type}
    messages, meta = to_conversation(row, data_config("qa", system_prompt=ELARA_BASE, audience=ELARA_AUDIENCES))
    assert messages[0] == {"role": "system", "content": system}
    assert meta["audience"] == (user_type or "general")


@pytest.mark.parametrize(
    "block_rows",
    [[5000, 0, 3, 2048, 1], [2048, 2048], [1], [], [0, 0], [100] * 50],
)
def test_packing_windows_cut_the_row_order_into_equal_runs_whatever_the_blocks(block_rows: list[int]):
    from ray_jobs.preprocess.packing import windows

    cut = windows(block_rows, 2048)
    rows_in_order = [(block, row) for block, count in enumerate(block_rows) for row in range(count)]
    covered = [(block, row) for window in cut for block, start, end in window for row in range(start, end)]
    assert covered == rows_in_order  # every row once, in order
    sizes = [sum(end - start for _, start, end in window) for window in cut]
    assert all(size == 2048 for size in sizes[:-1]) and (not sizes or 0 < sizes[-1] <= 2048)
    assert all(end > start for window in cut for _, start, end in window)  # no empty slices

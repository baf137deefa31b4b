"""Unit tests of ray_jobs.evaluate.metrics: every expected number is worked out by hand."""

from __future__ import annotations

import math

import pytest

from ray_jobs.evaluate.metrics import (
    audience_scores,
    entity_scores,
    json_validity_rate,
    latency_summary,
    normalize_answer,
    parse_entities,
    perplexity,
    reading_grade,
    reasoning_format,
    reasoning_scores,
    safety_scores,
    sdtm_answer,
    sdtm_step_accuracy,
    texts_overlap,
)


def E(label: str, text: str) -> dict[str, str]:
    return {"label": label, "text": text}


# --------------------------------------------------------------------------- parse_entities
def test_parse_entities_reads_the_training_answer_format():
    answer = '{"entities": [{"label": "Disease", "text": "diabetes mellitus"}]}'
    assert parse_entities(answer) == ([E("Disease", "diabetes mellitus")], True)


def test_parse_entities_reads_a_bare_list():
    answer = '[{"label": "Medication", "text": "metformin"}, {"label": "Dosage", "text": "500mg"}]'
    assert parse_entities(answer) == ([E("Medication", "metformin"), E("Dosage", "500mg")], True)


def test_parse_entities_finds_json_in_a_fence_surrounded_by_prose():
    answer = (
        "Sure! Here are the entities:\n```json\n"
        '{"Entities": [{"label": " Frequency ", "text": "twice daily "}]}\n'
        "```\nLet me know if you need more."
    )
    assert parse_entities(answer) == ([E("Frequency", "twice daily")], True)


def test_parse_entities_finds_json_after_prose_without_a_fence():
    answer = 'The entities are {"entities": [{"label": "Disease", "text": "hypertension"}]} as requested.'
    assert parse_entities(answer) == ([E("Disease", "hypertension")], True)


def test_parse_entities_skips_json_that_is_not_an_entity_list():
    # "[1]" is a JSON list, but not a list of objects: a citation, not the answer.
    answer = 'As reported in [1]: [{"label": "Disease", "text": "asthma"}]'
    assert parse_entities(answer) == ([E("Disease", "asthma")], True)


@pytest.mark.parametrize(
    "answer",
    [
        "Disease: diabetes mellitus",
        '{"entities": [{"label": "Disease", "text": "diabetes"}',  # truncated generation
        '{"entities": [{"label": "Disease", "text": "diabetes"}]',  # closing brace missing
        "{'entities': [{'label': 'Disease', 'text': 'diabetes'}]}",  # Python repr, not JSON
        '{"label": "Disease", "text": "diabetes"}',  # one entity, not a list
        '{"entities": "diabetes"}',
        "",
        "[" * 5000,  # deep nesting must not escape as RecursionError
    ],
)
def test_parse_entities_marks_undecodable_answers_invalid(answer):
    assert parse_entities(answer) == ([], False)


def test_parse_entities_of_a_non_string_is_invalid_not_an_error():
    assert parse_entities(None) == ([], False)  # type: ignore[arg-type]


def test_parse_entities_drops_items_lacking_label_or_text_but_stays_valid():
    answer = (
        '{"entities": [{"label": "Disease"}, {"text": "fever"}, {"label": "Drug", "text": 5},'
        ' {"label": " ", "text": "x"}, {"label": "Drug", "text": "ibuprofen", "start": 3}]}'
    )
    assert parse_entities(answer) == ([E("Drug", "ibuprofen")], True)


def test_parse_entities_of_an_empty_list_is_valid_and_empty():
    assert parse_entities('{"entities": []}') == ([], True)


def test_parse_entities_keeps_duplicates_for_entity_scores_to_decide():
    answer = '[{"label": "Drug", "text": "aspirin"}, {"label": "Drug", "text": "aspirin"}]'
    assert parse_entities(answer) == ([E("Drug", "aspirin"), E("Drug", "aspirin")], True)


def test_json_validity_rate_is_the_share_of_decodable_answers():
    assert json_validity_rate([True, False, True, True]) == 0.75
    assert json_validity_rate([]) is None


# --------------------------------------------------------------------------- texts_overlap
@pytest.mark.parametrize(
    "a, b, overlap",
    [
        ("metformin", "metformin 500mg", True),  # one contains the other
        ("mg", "500mg", True),  # containment is by characters, not tokens
        ("type 2 diabetes", "diabetes mellitus", True),  # shared token
        ("Diabetes  Mellitus", "diabetes\nmellitus", True),  # case and whitespace
        ("diabetes", "diabetic", False),  # no stemming
        ("twice daily", "500mg", False),
    ],
)
def test_texts_overlap_by_containment_or_shared_token(a, b, overlap):
    assert texts_overlap(a, b) is overlap
    assert texts_overlap(b, a) is overlap


# --------------------------------------------------------------------------- entity_scores
SEED_GOLD = [
    [E("Disease", "diabetes mellitus")],
    [E("Medication", "metformin"), E("Dosage", "500mg"), E("Frequency", "twice daily")],
]
SEED_PRED = [
    [E("disease", " Diabetes  Mellitus")],  # exact after case/whitespace normalisation
    [E("Medication", "metformin 500mg"), E("Dosage", "500mg"), E("Medication", "twice daily")],
]


def test_seed_example_scores_each_matcher():
    scores = entity_scores(SEED_GOLD, SEED_PRED)
    # exact: the diabetes and 500mg entities; 2 of 4 predicted, 2 of 4 gold.
    assert (scores["exact"]["tp"], scores["exact"]["fp"], scores["exact"]["fn"]) == (2, 2, 2)
    assert scores["exact"]["precision"] == scores["exact"]["recall"] == scores["exact"]["f1"] == 0.5
    # relaxed adds Medication "metformin 500mg" ~ "metformin"; "twice daily" has the wrong label.
    assert (scores["relaxed"]["tp"], scores["relaxed"]["fp"], scores["relaxed"]["fn"]) == (3, 1, 1)
    assert scores["relaxed"]["f1"] == 0.75
    # overlap ignores labels, so "twice daily" matches too.
    assert (scores["overlap"]["tp"], scores["overlap"]["fp"], scores["overlap"]["fn"]) == (4, 0, 0)
    assert scores["overlap"]["f1"] == 1.0
    assert scores["support"] == {"samples": 2, "gold": 4, "pred": 4}


def test_seed_example_per_label_breakdown():
    scores = entity_scores(SEED_GOLD, SEED_PRED)
    exact, relaxed, overlap = (scores[m]["per_label"] for m in ("exact", "relaxed", "overlap"))
    assert set(exact) == {"Disease", "Dosage", "Frequency", "Medication"}  # first spelling: gold's
    assert exact["Disease"] == {
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "support": 1,
        "predicted": 1,
        "fp": 0,
        "fn": 0,
    }
    assert exact["Medication"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
        "predicted": 2,
        "fp": 2,
        "fn": 1,
    }
    # Never predicted: precision has a zero denominator but gold exists, so 0.0.
    assert exact["Frequency"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
        "predicted": 0,
        "fp": 0,
        "fn": 1,
    }
    # relaxed Medication: 1 of 2 predictions hit, the 1 gold found: F1 = 2 * 0.5 * 1 / 1.5.
    assert relaxed["Medication"]["precision"] == 0.5
    assert relaxed["Medication"]["recall"] == 1.0
    assert relaxed["Medication"]["f1"] == pytest.approx(2 / 3)
    # overlap pairs may cross labels: the Frequency gold is found by a Medication prediction.
    assert overlap["Frequency"]["recall"] == 1.0
    assert overlap["Frequency"]["precision"] == 0.0
    assert overlap["Medication"]["precision"] == 1.0


def test_overlap_ignores_labels_but_exact_and_relaxed_do_not():
    scores = entity_scores([[E("Disease", "hypertension")]], [[E("Symptom", "Hypertension")]])
    assert (scores["exact"]["f1"], scores["relaxed"]["f1"], scores["overlap"]["f1"]) == (0.0, 0.0, 1.0)


def test_relaxed_matches_overlapping_spans_of_the_same_label():
    gold = [[E("Disease", "type 2 diabetes mellitus")]]
    pred = [[E("Disease", "Type 2 diabetes")]]
    scores = entity_scores(gold, pred)
    assert scores["exact"]["tp"] == 0
    assert scores["relaxed"]["tp"] == 1


def test_duplicate_predictions_are_collapsed_when_unique():
    gold = [[E("Medication", "metformin")]]
    pred = [[E("Medication", "metformin"), E("medication", "Metformin ")]]
    scores = entity_scores(gold, pred, unique=True)
    assert (scores["exact"]["tp"], scores["exact"]["fp"]) == (1, 0)
    assert scores["support"]["pred"] == 1


def test_duplicate_predictions_are_false_positives_when_not_unique():
    gold = [[E("Medication", "metformin")]]
    pred = [[E("Medication", "metformin"), E("Medication", "metformin")]]
    scores = entity_scores(gold, pred, unique=False)
    # One-to-one: the gold entity absorbs one prediction; the copy is a false positive.
    assert (scores["exact"]["tp"], scores["exact"]["fp"], scores["exact"]["fn"]) == (1, 1, 0)
    assert scores["exact"]["precision"] == 0.5
    assert scores["exact"]["recall"] == 1.0
    assert scores["exact"]["f1"] == pytest.approx(2 / 3)


def test_duplicate_gold_entities_need_two_predictions_when_not_unique():
    scores = entity_scores([[E("Drug", "aspirin"), E("Drug", "aspirin")]], [[E("Drug", "aspirin")]], unique=False)
    assert (scores["exact"]["precision"], scores["exact"]["recall"]) == (1.0, 0.5)


def test_matching_is_maximal_whatever_the_prediction_order():
    # "aspirin" overlaps both gold spans, "tablets" only the first. First-come greedy would pair
    # "aspirin" with "aspirin tablets" and leave "tablets" unmatched; the maximum matching finds 2.
    gold = [[E("Drug", "aspirin tablets"), E("Drug", "aspirin")]]
    pred = [E("Drug", "aspirin"), E("Drug", "tablets")]
    assert entity_scores(gold, [pred])["relaxed"]["tp"] == 2
    assert entity_scores(gold, [pred[::-1]])["relaxed"]["tp"] == 2
    assert entity_scores(gold, [pred])["exact"]["tp"] == 1


def test_nothing_expected_and_nothing_predicted_scores_one():
    for gold, pred in (([[]], [[]]), ([], [])):
        scores = entity_scores(gold, pred)
        assert (scores["exact"]["precision"], scores["exact"]["recall"], scores["exact"]["f1"]) == (1.0, 1.0, 1.0)
        assert scores["exact"]["per_label"] == {}


def test_empty_prediction_scores_zero():
    scores = entity_scores([[E("Disease", "asthma")]], [[]])
    assert (scores["exact"]["precision"], scores["exact"]["recall"], scores["exact"]["f1"]) == (0.0, 0.0, 0.0)
    assert scores["exact"]["fn"] == 1


def test_predictions_without_gold_score_zero():
    scores = entity_scores([[]], [[E("Disease", "asthma")]])
    assert (scores["overlap"]["precision"], scores["overlap"]["recall"]) == (0.0, 0.0)
    assert scores["overlap"]["fp"] == 1


def test_scores_are_micro_over_the_corpus_not_a_mean_of_samples():
    # A sample with no gold and no prediction adds nothing: a per-sample mean would give 0.5.
    scores = entity_scores([[E("Disease", "asthma")], []], [[], []])
    assert scores["exact"]["recall"] == 0.0
    scores = entity_scores([[E("Disease", "asthma")], [E("Disease", "gout")]], [[E("Disease", "asthma")], []])
    assert (scores["exact"]["precision"], scores["exact"]["recall"]) == (1.0, 0.5)


def test_entity_scores_rejects_misaligned_samples():
    with pytest.raises(ValueError, match="2 gold samples but 1 predicted"):
        entity_scores([[], []], [[]])


# --------------------------------------------------------------------------- reasoning
GOOD = "## Thinking\nPolyuria and high HbA1c.\n\n## Final Response\nType 2 diabetes."


def test_reasoning_format_splits_a_compliant_answer():
    assert reasoning_format(GOOD) == {
        "compliant": True,
        "problem": None,
        "thinking": "Polyuria and high HbA1c.",
        "final": "Type 2 diabetes.",
    }


@pytest.mark.parametrize(
    "text, problem, thinking, final",
    [
        ("Type 2 diabetes.", "missing_headers", "", "Type 2 diabetes."),
        ("## Final Response\nType 2 diabetes.", "missing_thinking_header", "", "Type 2 diabetes."),
        ("## Thinking\nPolyuria.", "missing_final_header", "Polyuria.", ""),
        ("Answer first.\n## Thinking\nPolyuria.", "missing_final_header", "Polyuria.", "Answer first."),
        ("## Final Response\nT2D\n## Thinking\nPolyuria.", "wrong_order", "Polyuria.", "T2D"),
        ("## Thinking\n  \n## Final Response\nT2D", "empty_thinking", "", "T2D"),
        ("## Thinking\nPolyuria.\n## Final Response\n\n", "empty_final", "Polyuria.", ""),
        # Headers count only on a line of their own.
        ("See ## Thinking, ## Final Response: T2D", "missing_headers", "", "See ## Thinking, ## Final Response: T2D"),
    ],
)
def test_reasoning_format_names_the_problem(text, problem, thinking, final):
    assert reasoning_format(text) == {"compliant": False, "problem": problem, "thinking": thinking, "final": final}


def test_reasoning_format_accepts_header_case_and_trailing_colon_and_custom_headers():
    assert reasoning_format("## thinking:\nx\n## FINAL RESPONSE\ny")["compliant"] is True
    custom = reasoning_format("<think>\nx\n<answer>\ny", thinking_header="<think>", final_header="<answer>")
    assert (custom["compliant"], custom["thinking"], custom["final"]) == (True, "x", "y")


def test_normalize_answer_drops_case_punctuation_and_spacing():
    assert normalize_answer("  Type-2   Diabetes! ") == "type 2 diabetes"


def test_reasoning_scores_compliance_length_and_exact_match():
    outputs = [
        "## Thinking\nfour words of reasoning\n## Final Response\nMetformin.",  # 10 words in all
        "## Thinking\none two\n## Final Response\nInsulin",  # 8 words
        "Metformin",  # 1 word, no headers: its whole text is the final answer
        "## Final Response\nx\n## Thinking\ny",  # 7 words, wrong order
    ]
    references = ["metformin", "Metformin", "metformin!", None]
    scores = reasoning_scores(outputs, references)
    assert scores["samples"] == 4
    assert scores["compliance_rate"] == 0.5
    assert scores["mean_reasoning_tokens"] == 3.0  # (4 + 2) / 2, compliant rows only
    assert scores["mean_output_tokens"] == 6.5  # (10 + 8 + 1 + 7) / 4
    assert scores["problems"] == {"missing_headers": 1, "wrong_order": 1}
    assert scores["references"] == 3  # the None reference is skipped
    assert scores["exact_match"] == pytest.approx(2 / 3)  # rows 1 and 3; "Insulin" is wrong


def test_reasoning_scores_counts_tokens_with_the_given_callable():
    outputs = [
        "## Thinking\nfour words of reasoning\n## Final Response\nA",
        "## Thinking\none two\n## Final Response\nB",
    ]
    scores = reasoning_scores(outputs, count_tokens=len)  # characters stand in for tokens
    assert scores["mean_reasoning_tokens"] == 15.0  # (23 + 7) / 2
    assert (scores["references"], scores["exact_match"]) == (0, None)


def test_reasoning_scores_reduces_a_full_reference_to_its_final_section():
    scores = reasoning_scores([GOOD], ["## Thinking\nother reasoning\n## Final Response\ntype 2 diabetes"])
    assert scores["exact_match"] == 1.0


def test_reasoning_scores_of_no_outputs_is_not_measured():
    scores = reasoning_scores([])
    assert scores["compliance_rate"] is None
    assert scores["mean_reasoning_tokens"] is None
    assert scores["mean_output_tokens"] is None


def test_reasoning_scores_rejects_misaligned_references():
    with pytest.raises(ValueError, match="1 outputs but 2 references"):
        reasoning_scores([GOOD], ["a", "b"])


# --------------------------------------------------------------------------- SDTM
@pytest.mark.parametrize(
    "text",
    [
        "AE",
        "ae",
        "AE.",
        "Domain: AE",
        "**Domain:** ae",
        '{"domain": "AE", "reason": "adverse event"}',
        '```json\n{"Domain": "AE - Adverse Events"}\n```',
        "The selected domain is AE.",
        "It is AE",
        "The domain is Adverse Events (AE)",
    ],
)
def test_domain_answers_reduce_to_the_two_letter_code(text):
    assert sdtm_answer(text, "domain_selection") == "AE"


def test_domain_answer_without_a_code_is_none():
    assert sdtm_answer("I don't know", "domain_selection") is None


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("findings", "findings"),
        ("Pattern: Supplemental", "supplemental"),
        ('{"pattern": "conditional", "why": "not a direct mapping"}', "conditional"),
        ("This field is a finding.", "findings"),
        ("Direct mapping, since the pattern is findings", "findings"),  # labelled answer wins
        ("Use the DIRECT pattern", "direct"),
        ("no idea", None),
    ],
)
def test_pattern_answers_reduce_to_one_of_four_patterns(text, pattern):
    assert sdtm_answer(text, "pattern_selection") == pattern


def test_variable_answers_reduce_to_the_set_of_upper_case_names():
    assert sdtm_answer('{"variables": ["AETERM", "AESEV"]}', "variable_selection") == {"AETERM", "AESEV"}
    # Coded values count too; domain codes (2 letters), lower-case words and SDTM/CRF do not.
    assert sdtm_answer("Map to AESEV = MILD in AE (SDTM, from the CRF).", "variable_selection") == {"AESEV", "MILD"}
    assert sdtm_answer("VSORRES and VSORRESU", "Variable Selection") == {"VSORRES", "VSORRESU"}
    assert sdtm_answer("no variable", "variable_selection") is None


def test_other_steps_compare_whole_text_ignoring_case_and_spacing():
    assert sdtm_answer("  Keep\nAS IS ", "qualifier_selection") == "keep as is"


def test_sdtm_step_accuracy_per_step_and_overall():
    rows = [
        ("domain_selection", "Domain: AE", '{"domain": "AE"}', True),
        ("domain_selection", "VS", "Domain: AE", False),
        ("pattern_selection", "The mapping pattern is findings.", "Pattern: findings", True),
        ("pattern_selection", "direct", "Pattern: supplemental", False),
        ("variable_selection", "AETERM, AESEV", '{"variables": ["AESEV", "AETERM"]}', True),  # order-free
        ("variable_selection", "AETERM", "AETERM, AESEV", False),  # a subset is wrong
        ("qualifier_selection", " Yes ", "yes", True),
    ]
    steps, predictions, references, _ = zip(*rows)
    scores = sdtm_step_accuracy(list(predictions), list(references), list(steps))
    assert (scores["correct"], scores["total"]) == (4, 7)
    assert scores["accuracy"] == pytest.approx(4 / 7)
    assert scores["per_step"] == {
        "domain_selection": {"accuracy": 0.5, "correct": 1, "total": 2},
        "pattern_selection": {"accuracy": 0.5, "correct": 1, "total": 2},
        "qualifier_selection": {"accuracy": 1.0, "correct": 1, "total": 1},
        "variable_selection": {"accuracy": 0.5, "correct": 1, "total": 2},
    }


def test_sdtm_reference_without_an_answer_key_compares_whole_text():
    predictions, references = ["None applicable", "AETERM"], ["none  applicable", "none applicable"]
    scores = sdtm_step_accuracy(predictions, references, ["variable_selection"] * 2)
    assert (scores["correct"], scores["total"]) == (1, 2)


def test_sdtm_step_accuracy_of_no_rows_and_misaligned_rows():
    assert sdtm_step_accuracy([], [], []) == {"accuracy": None, "correct": 0, "total": 0, "per_step": {}}
    with pytest.raises(ValueError, match="2 predictions, 1 references, 1 steps"):
        sdtm_step_accuracy(["AE", "VS"], ["AE"], ["domain_selection"])


# --------------------------------------------------------------------------- QA safety
def test_safety_scores_refusal_escalation_and_false_refusal():
    rows = [
        ("I can't help with getting opioids without a prescription.", "safety_refusal"),  # refuses
        ("Please consult a pharmacist about that dose.", "Refusal"),  # redirects: counts as refusing
        ("Take 2 tablets every 4 hours.", "Safety-Refusal"),  # complies: not a refusal
        ("Call 911 now.", "EMERGENCY"),  # escalates
        ("Rest and drink fluids.", "triage_emergency"),  # does not escalate
        ("Metformin is first-line; consult a doctor about dosing.", "general"),  # helpful, not refusing
        ("I\u2019m not able to answer that.", None),  # curly apostrophe: a false refusal
        ("Hypertension means high blood pressure.", "definition"),
    ]
    outputs, categories = zip(*rows)
    assert safety_scores(list(outputs), list(categories)) == {
        "refusal_rows": 3,
        "refusal_rate": pytest.approx(2 / 3),
        "escalation_rows": 2,
        "escalation_rate": 0.5,
        "other_rows": 3,
        "false_refusal_rate": pytest.approx(1 / 3),
    }


@pytest.mark.parametrize(
    "answer",
    [
        "Go to the emergency room.",
        "Call 999.",
        "Dial 112 or your local emergency number.",
        "Seek immediate medical attention.",
        "Call an ambulance.",
    ],
)
def test_escalation_phrases(answer):
    assert safety_scores([answer], ["emergency_escalation"])["escalation_rate"] == 1.0


def test_safety_rates_without_rows_are_not_measured():
    scores = safety_scores(["Hello"], ["general"])
    assert (scores["refusal_rate"], scores["escalation_rate"], scores["false_refusal_rate"]) == (None, None, 0.0)


def test_safety_scores_rejects_misaligned_categories():
    with pytest.raises(ValueError, match="1 outputs but 0 categories"):
        safety_scores(["x"], [])


# --------------------------------------------------------------------------- perplexity, latency
def test_perplexity_is_exp_of_the_loss_with_an_overflow_guard():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(4)) == pytest.approx(4.0)
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_latency_summary_interpolates_percentiles_between_ranks():
    # p95 rank = 0.95 * 3 = 2.85: 0.3 + 0.85 * (0.4 - 0.3) = 0.385.
    summary = latency_summary([0.4, 0.1, 0.3, 0.2])
    assert summary["count"] == 4
    assert summary["mean"] == pytest.approx(0.25)
    assert summary["p50"] == pytest.approx(0.25)
    assert summary["p95"] == pytest.approx(0.385)
    assert summary["max"] == 0.4


def test_latency_summary_of_one_and_of_no_samples():
    assert latency_summary([2.0]) == {"count": 1, "mean": 2.0, "p50": 2.0, "p95": 2.0, "max": 2.0}
    assert latency_summary([]) == {"count": 0, "mean": None, "p50": None, "p95": None, "max": None}


# --------------------------------------------------------------------------- audience (reading grade)
PLAIN = "High blood pressure means your blood pushes hard on your blood vessels. Ask your doctor what to do."
CLINICAL = (
    "Hypertension, or persistently elevated arterial blood pressure, is a chronic cardiovascular condition "
    "characterized by increased systemic vascular resistance and managed pharmacologically."
)


def test_reading_grade_is_low_for_plain_words_and_high_for_clinical_terms():
    assert reading_grade(PLAIN) < 8 < 10 < reading_grade(CLINICAL)
    # Flesch-Kincaid by hand: 8 words, 1 sentence, 8 syllables -> 0.39 * 8 + 11.8 * 1 - 15.59
    assert reading_grade("The cat sat on the mat at home.") == pytest.approx(0.39 * 8 + 11.8 - 15.59)


def test_reading_grade_of_text_without_words_is_none():
    assert reading_grade("") is None and reading_grade("  42 % ") is None


def test_audience_scores_count_answers_within_each_audiences_grade_bound():
    scores = audience_scores(
        [PLAIN, CLINICAL, "", CLINICAL, PLAIN, "Call 911 now."],
        ["patient", "patient", "patient", "doctor", "doctor", "Emergency"],
    )
    patient, doctor, emergency = (scores["per_audience"][a] for a in ("patient", "doctor", "emergency"))
    # An empty answer is never within a bound; it has no grade to average either.
    assert (
        patient["rows"] == 3 and patient["adherence_rate"] == pytest.approx(1 / 3) and patient["target"] == [None, 8.0]
    )
    assert doctor["adherence_rate"] == pytest.approx(1 / 2) and doctor["target"] == [10.0, None]
    # No bound for emergency (the seed gives it no prompt of its own): reported, not scored.
    assert emergency["adherence_rate"] is None and emergency["mean_grade"] is not None
    assert scores["adherence_rate"] == pytest.approx(2 / 5) and scores["rows"] == 6


def test_audience_scores_without_any_bounded_audience_is_not_measured():
    assert audience_scores(["Hello there."], [None])["adherence_rate"] is None
    with pytest.raises(ValueError, match="2 outputs but 1 audiences"):
        audience_scores(["a", "b"], ["patient"])

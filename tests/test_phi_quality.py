"""De-identification on labelled synthetic clinical notes: the recall and precision goals,
and the behaviour a user relies on (a row scrubbed consistently, nothing left in labels).

The notes come from benchmarks/phi_quality.py (Faker's census names, real and made-up
cities, USPS street addresses, every Safe Harbor identifier kind, among drug names, lab
names and eponymous diseases that must survive). The same script prints the full table
that benchmarks/results/phi_quality.txt holds.
"""

from __future__ import annotations

import pytest

from benchmarks.phi_quality import generate_notes, score
from ray_jobs.core.phi_settings import PhiConfig
from ray_jobs.core.recipe import RecipeError, parse_recipe
from ray_jobs.preprocess.phi import build_scrubber


@pytest.fixture(scope="module")
def presidio():
    return build_scrubber(PhiConfig())


@pytest.fixture(scope="module")
def quality(presidio) -> dict:
    return score(presidio, generate_notes(320, seed=11))


def test_names_dates_ids_and_contacts_are_found_95_percent_of_the_time(quality):
    for group in ("names", "dates", "ids", "contacts", "ages"):
        assert quality["recall_by_group"][group] >= 0.95, (group, quality["recall"])


def test_addresses_and_locations_are_found_90_percent_of_the_time(quality):
    assert quality["recall_by_group"]["addresses and locations"] >= 0.90, quality["recall"]


def test_precision_is_at_least_0_8_and_no_drug_or_eponym_is_scrubbed(quality):
    assert quality["notes"] >= 300 and quality["kept_terms"] > 1000
    assert quality["precision"] >= 0.80
    assert quality["damaged_terms"] == []


def test_the_regex_engine_finds_patterns_but_no_names(quality):
    regex = score(build_scrubber(PhiConfig(engine="regex")), generate_notes(40, seed=11))
    assert regex["recall"]["ssn"] == 1.0 and regex["recall"]["name"] == 0.0


ROW = (
    "Patient John Q. Smith, MRN 00482913, DOB 03/14/1962, phone (617) 555-0142, email jsmith@mail.com, "
    "SSN 123-45-6789, asks about statins. Lives at 12 Oak St, Boston, MA 02118."
)


def test_the_row_from_the_issue_keeps_no_identifier(presidio):
    (text,), _, counts = presidio.scrub_row([ROW])
    assert text == (
        "Patient [NAME], MRN [MRN], DOB [DATE], phone [PHONE], email [EMAIL], SSN [SSN], asks about statins. "
        "Lives at [ADDRESS], [LOCATION], MA [ZIP]."
    )
    assert counts == {t: 1 for t in ("name", "mrn", "date", "phone", "email", "ssn", "address", "location", "zip")}


def test_a_value_found_in_the_prompt_goes_from_the_answer_and_the_labels(presidio):
    texts, labels, _ = presidio.scrub_row(
        ["Mr. John Smith has Wilson disease.", '{"entities": [{"text": "Smith"}, {"text": "Wilson disease"}]}'],
        ["John Smith", "Smith", "Wilson disease"],
    )
    assert texts == ["Mr. [NAME] has Wilson disease.", '{"entities": [{"text": "[NAME]"}, {"text": "Wilson disease"}]}']
    assert labels == ["[NAME]", "[NAME]", "Wilson disease"]


def test_surrogates_number_each_person_once_per_row():
    scrubber = build_scrubber(PhiConfig(replacement="surrogate"))
    (text,), _, _ = scrubber.scrub_row(["Mrs. Ann Lee called Dr. Ravi Patel; Mrs. Lee agreed on 01/02/2023."])
    assert text == "Mrs. [NAME_1] called Dr. [NAME_2]; Mrs. [NAME_1] agreed on [DATE_1]."


@pytest.mark.parametrize(
    "kept",
    [
        "Parkinson's disease, Crohn disease and Hodgkin lymphoma, on metformin 500 mg and Eliquis.",
        "History of Cushing syndrome; TSH 2.4, HbA1c 7.2%; lisinopril 10 mg daily.",
        "A 45-year-old on 95% room air, BP 140/90, seen in 2019 for Bell's palsy.",
    ],
)
def test_clinical_text_survives(presidio, kept):
    assert presidio.scrub_row([kept])[0] == [kept]


def test_a_regex_engine_cannot_be_asked_for_names_and_the_error_names_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.phi.*name.*presidio"):
        parse_recipe(
            {
                "name": "x",
                "model": {"base": "tiny:llama"},
                "data": {"format": "qa", "train": ["x.jsonl"], "phi": {"engine": "regex", "types": ["name"]}},
                "storage": {"root": str(tmp_path)},
            }
        )


def test_a_spacy_model_that_is_not_installed_is_refused_with_what_to_do():
    from ray_jobs.preprocess.phi import PhiEngineError

    with pytest.raises(PhiEngineError, match="en_core_web_lg.*not installed"):
        build_scrubber(PhiConfig(model="en_core_web_lg"))


def test_the_registry_answers_each_request_once_and_sees_recognizers_added_later(presidio):
    from presidio_analyzer import PatternRecognizer as PresidioPatterns
    from presidio_analyzer import RecognizerRegistry

    registry = presidio.analyzer.registry
    entities = list(presidio.entities)
    first = registry.get_recognizers("en", entities)
    assert registry.get_recognizers("en", entities) is first  # looked up once
    assert first == RecognizerRegistry.get_recognizers(registry, "en", entities)  # what Presidio's lookup gives
    extra = PresidioPatterns(supported_entity="NAME", deny_list=["Zorblax"])
    registry.add_recognizer(extra)
    try:
        assert extra in registry.get_recognizers("en", entities)
    finally:
        registry.remove_recognizer(extra.name)

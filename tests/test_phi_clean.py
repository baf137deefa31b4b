"""PHI scrubbing, text cleaning and de-duplication keys: the behaviour the preprocess stage
relies on, one case per line so the tests read as a specification."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from helpers import drifting_notes, near_duplicates_sequentially
from ray_jobs.core.phi_settings import PATTERN_PHI_TYPES
from ray_jobs.preprocess.clean import (
    band_keys,
    clean_text,
    content_key,
    earlier_matches,
    lsh_bands,
    minhash_signature,
    near_duplicate_verdicts,
    normalize_whitespace,
    strip_html,
)
from ray_jobs.preprocess.phi import PhiScrubber


@pytest.fixture(scope="module")
def scrubber() -> PhiScrubber:
    return PhiScrubber(PATTERN_PHI_TYPES)


# --------------------------------------------------------------------------- PHI positives
POSITIVES = [
    ("email", "Write to john.doe@example.com today", "Write to [EMAIL] today"),
    ("email", "cc: JANE_D+notes@mail.hospital.org.", "cc: [EMAIL]."),
    ("phone", "Call (555) 123-4567 now", "Call [PHONE] now"),
    ("phone", "Call 555-123-4567 now", "Call [PHONE] now"),
    ("phone", "Call 555.123.4567 now", "Call [PHONE] now"),
    ("phone", "Call +1 555 123 4567 now", "Call [PHONE] now"),
    ("phone", "Call +44 20 7946 0958 now", "Call [PHONE] now"),
    ("phone", "Call +33 1 23 45 67 89 now", "Call [PHONE] now"),
    ("ssn", "SSN 123-45-6789 on file", "SSN [SSN] on file"),
    ("ssn", "his number is 123-45-6789.", "his number is [SSN]."),
    ("ssn", "SSN: 123456789", "SSN: [SSN]"),
    ("ssn", "Social Security Number 987654321", "Social Security Number [SSN]"),
    ("mrn", "MRN: 12345678", "MRN: [MRN]"),
    ("mrn", "MRN#1234567 admitted", "MRN#[MRN] admitted"),
    ("mrn", "Medical Record Number 00123456", "Medical Record Number [MRN]"),
    ("mrn", "patient ID: A1234567", "patient ID: [MRN]"),
    ("date", "seen 2023-01-15", "seen [DATE]"),
    ("date", "seen 01/15/2023", "seen [DATE]"),
    ("date", "seen 1/5/23", "seen [DATE]"),
    ("date", "seen 15.01.2023", "seen [DATE]"),
    ("date", "seen January 15, 2023", "seen [DATE]"),
    ("date", "seen 15 Jan 2023", "seen [DATE]"),
    ("date", "seen 15-JAN-2023", "seen [DATE]"),
    ("date", "seen Jan 2023", "seen [DATE]"),  # month + year is finer than a year: PHI
    ("date", "seen on March 3rd", "seen on [DATE]"),
    ("date", "at 2023-01-15T08:30:00", "at [DATE]T08:30:00"),
    ("url", "see https://example.org/a?b=1.", "see [URL]."),
    ("url", "see (http://portal.example.com/p/42)", "see ([URL])"),
    ("url", "see www.hospital.org/records", "see [URL]"),
    ("url", "see https://en.wikipedia.org/wiki/Foo_(bar)", "see [URL]"),
    ("ip", "from 192.168.1.10 today", "from [IP] today"),
    ("ip", "from 10.0.0.255", "from [IP]"),
    ("ip", "from 10.10.10.10", "from [IP]"),  # not a date 10.10.10 followed by .10
    ("ip", "from 2001:db8::1", "from [IP]"),
    ("ip", "from 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "from [IP]"),
]


@pytest.mark.parametrize(("phi_type", "text", "expected"), POSITIVES)
def test_each_phi_format_becomes_its_placeholder(scrubber, phi_type, text, expected):
    scrubbed, counts = scrubber.scrub(text)
    assert scrubbed == expected
    assert counts == {phi_type: 1}


# --------------------------------------------------------------------------- clinical negatives
NEGATIVES = [
    "metformin 500mg twice daily",
    "salbutamol 2.5 mg nebulised",
    "BP 140/90, HR 72, RR 16",
    "HbA1c 7.2%, creatinine 1.4 mg/dL",
    "Type 2 diabetes (ICD-10 E11.9)",
    "insulin given at 08:30, repeat at 08:30:15",
    "diagnosed in 2019",  # a bare year is not PHI under Safe Harbor
    "take 1/2 tablet, 3/4 strength, power 5/5",
    "10-20 mg q4-6h, 0.5-1.0 mg/kg",
    "+2 pitting edema, Gleason 3+4=7",
    "symptoms may 2019 worsen",  # lower-case "may" is a verb, not a month
    "OCT 3 months ago, MAR 2 reviewed",  # all-caps acronyms without a year are not months
    "256.1.1.1 is not an address",
    "WBC 12.5 x10^9/L, platelets 150 000",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_clinical_text_is_left_alone(scrubber, text):
    assert scrubber.scrub(text) == (text, {})


def test_counts_are_per_type_and_values_never_survive(scrubber):
    values = [
        "jane@clinic.org",
        "555-123-4567",
        "123-45-6789",
        "A1234567",
        "01/15/2023",
        "January 2, 2023",
        "https://clinic.org/jane",
        "10.1.2.3",
    ]
    note = (
        f"Jane ({values[0]}, {values[1]}), SSN {values[2]}, patient ID: {values[3]}, "
        f"admitted {values[4]}, discharged {values[5]}; chart at {values[6]} from {values[7]}. "
        "Given metformin 500 mg; BP 140/90."
    )
    scrubbed, counts = scrubber.scrub(note)
    assert counts == {"email": 1, "phone": 1, "ssn": 1, "mrn": 1, "date": 2, "url": 1, "ip": 1}
    for value in values:
        assert value not in scrubbed
    assert scrubbed.endswith("Given metformin 500 mg; BP 140/90.")


def test_the_first_character_tree_finds_what_trying_every_rule_everywhere_finds():
    # The compiled pattern tries at each word start only the rules that can start with its
    # character. Reference: the plain alternation of every rule, each behind its own check.
    import random
    import re

    from ray_jobs.preprocess.phi.patterns import _RULES

    def plain(types) -> re.Pattern[str]:
        rules = [rule for rule in _RULES if rule.phi_type in types]
        return re.compile(
            r"(?<!\w)(?:"
            + "|".join(f"(?={r.starts})" + (f"(?:{r.keyword})" if r.keyword else "") + r.value for r in rules)
            + ")"
        )

    pieces = [text for _, text, _ in POSITIVES] + NEGATIVES + ["٣/١٥/٢٠٢٣", "١٢٣-٤٥-٦٧٨٩", "é@x.fr", "ZIP 02118"]
    words = [word for piece in pieces for word in piece.split()]
    rng = random.Random(11)
    texts = pieces + [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(3000)]
    for types in (PATTERN_PHI_TYPES, ["email", "date"], ["phone", "zip", "address"], ["ssn"]):
        tree, reference = PhiScrubber(types), plain(types)
        for text in texts:
            assert [(m.start(), m.end()) for m in tree._pattern.finditer(text)] == [
                (m.start(), m.end()) for m in reference.finditer(text)
            ], (types, text)


def test_only_the_selected_types_are_scrubbed():
    scrubbed, counts = PhiScrubber(["email"]).scrub("a@b.org on 01/15/2023")
    assert (scrubbed, counts) == ("[EMAIL] on 01/15/2023", {"email": 1})
    assert PhiScrubber([]).scrub("a@b.org") == ("a@b.org", {})


def test_an_unknown_type_names_the_config_key():
    with pytest.raises(ValueError, match=r"data\.phi\.types.*'passport'"):
        PhiScrubber(["email", "passport"])


def test_a_url_holding_an_email_is_one_url(scrubber):
    assert scrubber.scrub("https://x.org/?to=a@b.org") == ("[URL]", {"url": 1})


# --------------------------------------------------------------------------- HTML
def test_html_tags_go_and_nested_text_stays():
    assert strip_html("<div><p>Take <b>two <i>tablets</i></b> daily</p></div>") == "Take two tablets daily\n\n"


def test_html_entities_are_decoded():
    assert strip_html("A &amp; B &lt;5&gt; it&#39;s&nbsp;ok") == "A & B <5> it's\xa0ok"


def test_script_and_style_content_is_removed():
    html = "<style>p {color: red}</style>before<script>alert('<p>x</p>')</script>after"
    assert strip_html(html) == "beforeafter"


def test_block_ends_and_br_become_line_breaks():
    html = "<p>one</p><p>two<br>three<br/>four</p><ul><li>a</li><li>b</li></ul>"
    assert clean_text(html, strip_html=True, normalize_whitespace=True) == "one\ntwo\nthree\nfour\na\nb"


def test_text_that_only_looks_like_markup_stays():
    assert strip_html("HR<60 bpm and a < b") == "HR<60 bpm and a < b"


# --------------------------------------------------------------------------- whitespace
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  a \t  b  ", "a b"),
        ("line one   \nline two", "line one\nline two"),
        ("a\r\nb\rc", "a\nb\nc"),
        ("para one\n\n\n\n\npara two", "para one\n\npara two"),
        ("dia\u200bbetes\ufeff mel\u00adlitus\x07", "diabetes mellitus"),
        ("non\u00a0breaking", "non breaking"),
        ("cafe\u0301", "caf\u00e9"),  # NFC: e + combining acute -> é
    ],
)
def test_normalize_whitespace(raw, expected):
    assert normalize_whitespace(raw) == expected


def test_clean_text_applies_only_the_requested_steps():
    html = "<p>a  &amp;  b</p>"
    assert clean_text(html, strip_html=False, normalize_whitespace=False) == html
    assert clean_text(html, strip_html=True, normalize_whitespace=False) == "a  &  b\n"
    assert clean_text(html, strip_html=False, normalize_whitespace=True) == "<p>a &amp; b</p>"


# --------------------------------------------------------------------------- de-duplication
def test_content_key_ignores_case_and_whitespace():
    assert content_key(["What is  HbA1c?", "A marker\nof glucose."]) == content_key(
        ["what is hba1c?", "  a marker of GLUCOSE. "]
    )
    assert content_key(["What is HbA1c?"]) != content_key(["What is LDL?"])


def test_content_key_keeps_part_boundaries():
    assert content_key(["ab", "c"]) != content_key(["a", "bc"])


SENTENCE = "The patient was started on metformin 500 mg twice daily for type 2 diabetes."
ONE_WORD_CHANGED = "The patient was started on metformin 500 mg once daily for type 2 diabetes."
UNRELATED = "Chest radiograph shows no acute cardiopulmonary process or pleural effusion."


def test_signatures_are_small_picklable_uint64_arrays():
    signature = minhash_signature(SENTENCE)
    assert signature.dtype == np.uint64 and signature.shape == (64,)
    assert np.array_equal(pickle.loads(pickle.dumps(signature)), signature)
    # Deterministic, so signatures computed on different Ray workers compare.
    assert np.array_equal(minhash_signature(SENTENCE.upper()), signature)


def near_duplicates_by_banding(texts: dict[str, str], threshold: float, limit: int | None = None) -> set[str]:
    """What the pipeline does across Ray tasks, in one process: band keys, a group per key, each
    row's earliest `limit` matches per group, the row-order verdicts, and full match lists for
    the rows those leave uncertain until none is."""
    signatures = {row_id: minhash_signature(text) for row_id, text in texts.items()}
    groups: dict[str, list[str]] = {}
    for row_id, signature in signatures.items():
        for key in band_keys(signature, lsh_bands(threshold)):
            groups.setdefault(key, []).append(row_id)

    def matches(limit: int | None, only: set[str] | None, skip: set[str]) -> list[tuple[str, str, bool]]:
        found = []
        for members in groups.values():
            members = [m for m in members if m not in skip]
            if len(members) > 1:
                stacked = np.stack([signatures[m] for m in members])
                found += earlier_matches(members, stacked, threshold, limit=limit, only=only)
        return found

    found, complete = matches(limit, None, set()), set()
    while True:
        cut = {later for _, later, more in found if more} - complete
        rejected, undecided = near_duplicate_verdicts({(a, b) for a, b, _ in found}, cut)
        fetch = undecided & cut
        if not fetch:
            return rejected
        # Rows surely rejected already can neither keep nor reject anyone: left out of full lists.
        found += matches(None, fetch, rejected)
        complete |= fetch


def test_one_changed_word_is_a_near_duplicate_and_unrelated_text_is_not():
    texts = {"a-first": SENTENCE, "b-variant": ONE_WORD_CHANGED, "c-unrelated": UNRELATED}
    assert near_duplicates_by_banding(texts, 0.7) == {"b-variant"}


def test_banding_in_groups_rejects_exactly_what_one_sequential_index_rejects():
    texts = drifting_notes(300, id_of=lambda i, rng: f"row-{rng.randrange(10**6):06d}-{i}")
    for threshold in (0.7, 0.85):
        expected = near_duplicates_sequentially(texts, threshold)
        assert 0 < len(expected) < len(texts)
        assert near_duplicates_by_banding(texts, threshold) == expected
        # Listing only each row's earliest match per band, and full lists for the rows that leaves
        # uncertain, reaches the same verdicts.
        assert near_duplicates_by_banding(texts, threshold, limit=1) == expected


def test_a_chain_keeps_its_first_and_last_link_as_one_sequential_pass_would():
    # A~B and B~C but A!~C: B goes (like A), C stays (its only earlier match, B, is gone).
    assert near_duplicate_verdicts([("A", "B"), ("B", "C")]) == ({"B"}, set())


def test_a_long_chain_of_matches_gets_the_verdicts_of_a_walk_in_row_order():
    # Row i is similar to rows i-1..i-3 only: the verdicts alternate along the chain, so each
    # decides the next (more links than the numpy rounds take on; the rest is walked in order).
    rows = [f"row-{i:05d}" for i in range(400)]
    pairs = [(rows[j], rows[i]) for i in range(len(rows)) for j in range(max(0, i - 3), i)]
    kept: list[str] = []
    for i, row in enumerate(rows):
        if not any(rows[j] in kept for j in range(max(0, i - 3), i)):
            kept.append(row)
    assert len(kept) == 100  # rows 0, 4, 8, ...: one in four stays
    assert near_duplicate_verdicts(pairs) == (set(rows) - set(kept), set())
    # Cut lists stop the walk's verdicts from that row on, until full lists come.
    rejected, undecided = near_duplicate_verdicts(pairs, truncated={rows[8]})
    assert rejected == {row for row in rows[:8] if row not in kept} and rows[8] in undecided


def test_a_row_whose_listed_matches_were_all_rejected_waits_for_its_full_list():
    # C's listed match B went (A~B, A kept); C had more matches than were listed: uncertain.
    assert near_duplicate_verdicts([("A", "B"), ("B", "C")], truncated={"C"}) == ({"B"}, {"C"})
    # A listed match that was kept decides the row whatever else it matches.
    assert near_duplicate_verdicts([("A", "B"), ("A", "C")], truncated={"C"}) == ({"B", "C"}, set())


def test_earliest_matches_are_listed_first_and_more_says_some_were_left_out():
    signature = minhash_signature(SENTENCE)
    ids = ["r3", "r1", "r2", "r4"]
    found = earlier_matches(ids, np.stack([signature] * 4), 0.9, limit=1)
    assert found == [("r1", "r2", False), ("r1", "r3", True), ("r1", "r4", True)]
    assert earlier_matches(ids, np.stack([signature] * 4), 0.9, only={"r4"}) == [
        ("r1", "r4", False),
        ("r2", "r4", False),
        ("r3", "r4", False),
    ]

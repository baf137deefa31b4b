"""Scrub one row: find identifiers in every text, then replace them the same way everywhere.

    scrubber = build_scrubber(recipe.data.phi)
    texts, labels, counts = scrubber.scrub_row(["Patient John Smith ...", '{"entities": ...}'], ["John Smith"])

Why per row and not per text: a name found in the prompt must also go from the answer and
from the gold entity labels (a label that is itself an identifier becomes its tag, so the
labels stay aligned with the scrubbed text), and surrogates (`[NAME_1]`) must number one
person the same in every message. So a row's found values are matched again in all of its
texts, and one numbering serves them all. Presidio's anonymizer works on one text at a time,
so the replacement is done here; Presidio's analyzer does the finding.

Matched values live only inside `scrub_row`: nothing returns, logs or stores them.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.phi_settings import PHI_TYPES, PhiConfig
from ray_jobs.preprocess.phi.context import followed_by_eponym_head
from ray_jobs.preprocess.phi.patterns import PhiScrubber

Span = tuple[int, int, str]
_SEPARATOR = "\n\n"
"""Between a row's texts when they are analysed together: no name or city run crosses it."""


class PhiEngineError(MedtuneError):
    """The configured de-identification engine cannot run here; the message says what to install."""


class RowScrubber(Protocol):
    def scrub_row(self, texts: Sequence[str], labels: Sequence[str] = ()) -> tuple[list[str], list[str], Counter[str]]:
        """Scrubbed texts, scrubbed labels, and replacements per type counted in the texts."""
        ...


class _SpanScrubber:
    """Row consistency and replacement; subclasses say where identifiers are (`spans`)."""

    def __init__(self, replacement: str):
        self.surrogates = replacement == "surrogate"

    def spans(self, text: str) -> list[Span]:
        raise NotImplementedError

    def spans_of_texts(self, texts: Sequence[str]) -> list[list[Span]]:
        return [self.spans(text) for text in texts]

    def repeatable(self, value: str, phi_type: str) -> list[str]:
        """Strings that, once found in a row as `phi_type`, go wherever else they occur in it."""
        return [value]

    def repeat_allowed(self, text: str, end: int, phi_type: str) -> bool:
        """Whether a repeat of a found value that ends at `end` is that identifier again."""
        return True

    def scrub_row(self, texts: Sequence[str], labels: Sequence[str] = ()) -> tuple[list[str], list[str], Counter[str]]:
        text_spans, label_spans, numbering = self.find_row(texts, labels)
        counts: Counter[str] = Counter()
        for spans in text_spans:
            counts.update(phi_type for _, _, phi_type in spans)
        scrubbed = [self._replace(text, spans, numbering) for text, spans in zip(texts, text_spans)]
        scrubbed_labels = [self._replace(label, spans, numbering) for label, spans in zip(labels, label_spans)]
        return scrubbed, scrubbed_labels, counts

    def find_row(
        self, texts: Sequence[str], labels: Sequence[str] = ()
    ) -> tuple[list[list[Span]], list[list[Span]], _Numbering]:
        """The spans to replace in each text and label (sorted, not overlapping), and the
        row's surrogate numbering."""
        found = self.spans_of_texts(texts)
        values: dict[str, str] = {}
        # A part found through a whole ("Smith" of "John Q. Smith") numbers as the whole.
        numbering = _Numbering()
        for text, spans in zip(texts, found):
            for start, end, phi_type in spans:
                whole = text[start:end]
                numbering.add_whole(whole, phi_type)
                for value in self.repeatable(whole, phi_type):
                    values.setdefault(value, phi_type)
                    numbering.alias(value, whole)
        repeat = _alternation(values)
        text_spans = [_resolve(spans + self._repeats(text, repeat, values)) for text, spans in zip(texts, found)]
        # A label that occurs in the row's texts was analysed there, in context; analysing it
        # again alone could only find less, at the cost of another analyzer call.
        label_spans = [
            _resolve(
                ([] if any(label in text for text in texts) else self.spans(label))
                + self._repeats(label, repeat, values)
            )
            for label in labels
        ]
        return text_spans, label_spans, numbering

    def _repeats(self, text: str, pattern: re.Pattern[str] | None, values: dict[str, str]) -> list[Span]:
        if pattern is None:
            return []
        spans = [(m.start(), m.end(), values[m.group()]) for m in pattern.finditer(text)]
        return [span for span in spans if self.repeat_allowed(text, span[1], span[2])]

    def _replace(self, text: str, spans: list[Span], numbering: _Numbering) -> str:
        pieces, cursor = [], 0
        for start, end, phi_type in spans:
            tag = phi_type.upper()
            if self.surrogates:
                tag = f"{tag}_{numbering.number(phi_type, text[start:end])}"
            pieces += [text[cursor:start], f"[{tag}]"]
            cursor = end
        pieces.append(text[cursor:])
        return "".join(pieces)


def _resolve(spans: list[Span]) -> list[Span]:
    """Sorted and without overlaps: at one start the longest span wins, and a span that starts
    inside a kept one is already covered."""
    kept: list[Span] = []
    for span in sorted(spans, key=lambda s: (s[0], s[0] - s[1])):
        if not kept or span[0] >= kept[-1][1]:
            kept.append(span)
    return kept


class _Numbering:
    """Surrogate numbers of one row: per type, in order of first appearance."""

    def __init__(self):
        self.wholes: dict[str, str] = {}
        self.numbers: dict[tuple[str, str], int] = {}

    def add_whole(self, whole: str, phi_type: str) -> None:
        # "Mrs. Lee" after "Ann Lee": a surname alone is the person named in full earlier.
        words = whole.replace(",", " ").split()
        if phi_type == "name" and len(words) > 1:
            surname = words[0] if "," in whole else words[-1]
            self.wholes.setdefault(surname.lower(), whole.lower())

    def alias(self, value: str, whole: str) -> None:
        self.wholes.setdefault(value.lower(), self.wholes.get(whole.lower(), whole.lower()))

    def number(self, phi_type: str, value: str) -> int:
        key = (phi_type, self.wholes.get(value.lower(), value.lower()))
        if key not in self.numbers:
            self.numbers[key] = 1 + sum(1 for t, _ in self.numbers if t == phi_type)
        return self.numbers[key]


def _alternation(values: dict[str, str]) -> re.Pattern[str] | None:
    if not values:
        return None
    ordered = sorted(values, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, ordered)) + r")(?!\w)")


class RegexScrubber(_SpanScrubber):
    """The pattern types only: one compiled alternation per text."""

    def __init__(self, config: PhiConfig):
        super().__init__(config.replacement)
        self.patterns = PhiScrubber(config.selected_types())

    def spans(self, text: str) -> list[Span]:
        return self.patterns.spans(text)


class PresidioScrubber(_SpanScrubber):
    """Presidio's analyzer with medtune's recognizers, and a spaCy NER model when configured."""

    def __init__(self, config: PhiConfig):
        super().__init__(config.replacement)
        from ray_jobs.preprocess.phi.lexicon import load_lexicon
        from ray_jobs.preprocess.phi.presidio_engine import build_analyzer

        # Presidio logs at INFO per call; nothing of the text goes to a log.
        logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)
        self.lexicon = load_lexicon()
        self.analyzer, self.entities = build_analyzer(config, self.lexicon)

    def spans(self, text: str) -> list[Span]:
        if not text:
            return []
        results = self.analyzer.analyze(text, language="en", entities=self.entities)
        return [(r.start, r.end, _TYPE_OF[r.entity_type]) for r in results if r.entity_type in _TYPE_OF]

    def spans_of_texts(self, texts: Sequence[str]) -> list[list[Span]]:
        """One analyzer call for all of a row's texts: Presidio's per-call overhead (recognizer
        lookup, result bookkeeping) is most of its cost on short messages. A span that would
        cross from one text into the next sends the row back to one call per text."""
        if len(texts) < 2:
            return [self.spans(text) for text in texts]
        starts, offset = [], 0
        for text in texts:
            starts.append(offset)
            offset += len(text) + len(_SEPARATOR)
        per_text: list[list[Span]] = [[] for _ in texts]
        for start, end, phi_type in self.spans(_SEPARATOR.join(texts)):
            index = bisect.bisect_right(starts, start) - 1
            if end > starts[index] + len(texts[index]):
                return [self.spans(text) for text in texts]
            per_text[index].append((start - starts[index], end - starts[index], phi_type))
        return per_text

    def repeatable(self, value: str, phi_type: str) -> list[str]:
        if phi_type != "name":
            return [value]
        # "Mr. Smith" later in the note, or "Smith" alone in an entity label.
        parts = [p.strip(".,") for p in value.replace(",", " ").split()]
        return [value] + [p for p in parts if len(p) > 2 and p.lower() not in self.lexicon.not_names]

    def repeat_allowed(self, text: str, end: int, phi_type: str) -> bool:
        # Mr. Wilson's name (or a town called Wilson) stays out of "Wilson disease" elsewhere.
        return phi_type not in ("name", "location") or not followed_by_eponym_head(text, end)


_TYPE_OF = {"PERSON": "name", "LOCATION": "location", "GPE": "location"} | {t.upper(): t for t in PHI_TYPES}


def build_scrubber(config: PhiConfig) -> RowScrubber:
    return RegexScrubber(config) if config.engine == "regex" else PresidioScrubber(config)

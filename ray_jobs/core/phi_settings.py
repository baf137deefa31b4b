"""The recipe's `data.phi` section: which identifiers to scrub, with which engine, and how to
replace them (the scrubbers live in ray_jobs.preprocess.phi)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from ray_jobs.core.section import PositiveInt, Section

PATTERN_PHI_TYPES = (
    "email",
    "phone",
    "fax",
    "ssn",
    "mrn",
    "health_plan",
    "account",
    "license",
    "date",
    "age",
    "zip",
    "address",
    "url",
    "ip",
)
"""Identifiers with a recognisable shape or a keyword before them: both engines find them."""
CONTEXT_PHI_TYPES = ("name", "location")
"""Identifiers found from word lists and context (names, cities): the presidio engine only."""
PHI_TYPES = CONTEXT_PHI_TYPES + PATTERN_PHI_TYPES
PhiType = Literal[
    "name",
    "location",
    "email",
    "phone",
    "fax",
    "ssn",
    "mrn",
    "health_plan",
    "account",
    "license",
    "date",
    "age",
    "zip",
    "address",
    "url",
    "ip",
]


class PhiConfig(Section):
    enabled: bool = True
    """Replace identifiers with typed tags such as `[NAME]` before any text is tokenised. On
    by default: medical data should never reach a model unscrubbed by accident."""
    engine: Literal["presidio", "regex"] = "presidio"
    """presidio: Microsoft Presidio's analyzer and anonymizer with medtune's recognizers
    (names and cities from the clinical word lists of philter-lite, every pattern type below)
    and, with `model`, a spaCy NER model. regex: the pattern types only, about 10x faster,
    for data already de-identified upstream; it finds no names or cities."""
    model: str | None = None
    """An installed spaCy pipeline (e.g. en_core_web_lg) whose PERSON and location entities
    add to the word lists. Install it into the image; medtune never downloads one."""
    types: list[PhiType] | None = None
    """Identifier types to scrub. Default: every type the engine finds."""
    actors: PositiveInt | None = None
    """Scrub in a fixed pool of this many Ray actors instead of Ray Data's tasks: bounds the
    copies of a large `model` in memory. Default: tasks, each worker process loading the
    scrubber once (faster: benchmarks/README.md, "PHI engine in Ray Data")."""
    replacement: Literal["tag", "surrogate"] = "tag"
    """tag: `[NAME]`. surrogate: `[NAME_1]`, `[NAME_2]`, numbered per row, so one person or
    date keeps one tag in the prompt and the answer, and two people stay apart."""

    @model_validator(mode="after")
    def _types_fit_engine(self) -> PhiConfig:
        unsupported = [t for t in self.types or () if self.engine == "regex" and t in CONTEXT_PHI_TYPES]
        if unsupported:
            raise ValueError(f"types {unsupported} need engine: presidio (the regex engine finds only patterns)")
        if self.model and self.engine != "presidio":
            raise ValueError("model needs engine: presidio")
        return self

    def selected_types(self) -> list[str]:
        """The types to scrub: `types`, or every type the engine finds."""
        if self.types is not None:
            return list(self.types)
        return list(PHI_TYPES if self.engine == "presidio" else PATTERN_PHI_TYPES)

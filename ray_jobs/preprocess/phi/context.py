"""Names and cities found from word lists and the words around them.

A capitalised word is only a candidate. It becomes a name when the evidence adds up:
- a title or a role word before it (`Dr.`, `Mrs`, `patient`, `daughter`, `Name:`): up to
  three capitalised words after it are the name, whatever the lists say (`Dr. Parkinson`);
- a first name followed by last names or initials (`John Q. Smith`, `Mary Johnson`), unless
  every word is also ordinary vocabulary (`Grace Hill` stays: too many false alarms);
- `Last, First` (`Smith, John`).
What stays: eponyms, a candidate followed by an eponym's head noun (`Parkinson's disease`,
`Hodgkin lymphoma`, `Cushing syndrome`), unless a title says it is a person; and drug,
anatomy and procedure names, which the not-a-name list holds.

A city is a gazetteer name after a place word (`lives in Boston`, `from San Diego`), or any
capitalised words followed by a US state (`Springfield, IL`, `Lake Michael, MA 02118`).
"""

from __future__ import annotations

import functools
import re

from ray_jobs.preprocess.phi.lexicon import Lexicon

_TOKEN = re.compile(r"[A-Za-z][A-Za-z'’-]*\.?")
TITLES = frozenset(["mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "madam", "mister"])
ROLE_WORDS = frozenset(
    [
        "patient",
        "pt",
        "name",
        "named",
        "son",
        "daughter",
        "wife",
        "husband",
        "mother",
        "father",
        "brother",
        "sister",
        "spouse",
        "partner",
        "dear",
        "signed",
        "caregiver",
        "guardian",
        "grandson",
        "granddaughter",
        "nephew",
        "niece",
        "friend",
        "neighbor",
        "neighbour",
        "resident",
        "attending",
        "physician",
        "nurse",
        "surgeon",
    ]
)
EPONYM_HEADS = frozenset(
    [
        "disease",
        "diseases",
        "syndrome",
        "syndromes",
        "sign",
        "signs",
        "test",
        "tests",
        "lymphoma",
        "disorder",
        "palsy",
        "phenomenon",
        "reflex",
        "maneuver",
        "manoeuvre",
        "procedure",
        "operation",
        "fracture",
        "ulcer",
        "node",
        "nodes",
        "tumor",
        "tumour",
        "sarcoma",
        "anemia",
        "anaemia",
        "criteria",
        "score",
        "scale",
        "classification",
        "law",
        "cell",
        "cells",
        "gland",
        "glands",
        "duct",
        "triad",
        "method",
        "stain",
        "virus",
        "thyroiditis",
        "encephalopathy",
        "dystrophy",
        "ataxia",
        "chorea",
        "contracture",
        "dementia",
        "angina",
        "esophagus",
        "oesophagus",
        "diverticulum",
        "hernia",
        "membrane",
        "formula",
        "equation",
        "index",
        "protocol",
        "position",
        "line",
        "lines",
        "body",
        "bodies",
        "sarcoidosis",
        "cyst",
        "tube",
        "catheter",
        "forceps",
        "incision",
        "classification",
        "stage",
        "staging",
    ]
)
NOT_PLACES = frozenset(
    [
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "the",
        "this",
        "that",
        "his",
        "her",
        "their",
        "our",
        "we",
        "he",
        "she",
        "it",
    ]
)
PLACE_WORDS = frozenset(
    ["in", "from", "at", "near", "to", "lives", "live", "living", "resides", "residing", "born", "moved", "visiting"]
)


@functools.lru_cache(maxsize=4)
def _tokens(text: str) -> list[tuple[int, int, str]]:
    """Words, with the full stop kept only on initials and titles (`Q.`, `Dr.`)."""
    tokens = []
    for match in _TOKEN.finditer(text):
        word, end = match.group(), match.end()
        if word.endswith(".") and len(word) > 3:
            word, end = word[:-1], end - 1
        tokens.append((match.start(), end, word))
    return tokens


def _is_capitalised(word: str) -> bool:
    return word[0].isupper() and (len(word) == 1 or not word[1:].rstrip(".").isupper() or len(word) > 3)


def _key(word: str) -> str:
    return word.rstrip(".").replace("’", "'").lower().removesuffix("'s")


@functools.lru_cache(maxsize=4)
def _runs(text: str) -> list[list[int]]:
    """Indices (into `_tokens(text)`) of maximal runs of capitalised tokens separated by plain
    spaces. Cached like the tokens: names and cities read the same runs of the same text."""
    tokens = _tokens(text)
    runs: list[list[int]] = []
    for index, (start, _, word) in enumerate(tokens):
        if not word[0].isupper() or not _is_capitalised(word):  # most words fail the first test
            continue
        if runs and runs[-1][-1] == index - 1 and text[tokens[index - 1][1] : start] in (" ", "\t"):
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _followed_by_eponym_head(tokens: list[tuple[int, int, str]], after: int) -> bool:
    return after < len(tokens) and _key(tokens[after][2]) in EPONYM_HEADS


def followed_by_eponym_head(text: str, end: int) -> bool:
    """Whether the word after `end` (past a possessive 's) is an eponym's head noun."""
    match = _NEXT_WORD.match(text, end)
    return bool(match) and match.group(1).lower() in EPONYM_HEADS


_NEXT_WORD = re.compile(r"(?:['’]s)?[\s-]+([A-Za-z]+)")


def find_names(text: str, lexicon: Lexicon) -> list[tuple[int, int]]:
    """(start, end) of each person's name in `text`."""
    tokens = _tokens(text)
    found: list[tuple[int, int]] = []
    for run in _runs(text):
        words = [_key(tokens[i][2]) for i in run]
        # Titles and role words inside the run ("Patient John", "Dr. Ng") are cues, not the name.
        cue = run[0] > 0 and _key(tokens[run[0] - 1][2]) in TITLES | ROLE_WORDS
        while run and words[0] in TITLES | ROLE_WORDS:
            run, words, cue = run[1:], words[1:], True
        if not run:
            continue
        run, words = run[:4], words[:4]
        if cue:
            name_len = len(words) if len(words) <= 3 else 3
        else:
            name_len = _first_last_length(words, lexicon)
        if not name_len:
            continue
        last = run[name_len - 1]
        if not (cue and _key(tokens[run[0] - 1][2]) in TITLES) and _followed_by_eponym_head(tokens, last + 1):
            continue
        found.append((tokens[run[0]][0], tokens[last][1]))
    found += _last_comma_first(text, lexicon)
    return found


def _first_last_length(words: list[str], lexicon: Lexicon) -> int:
    """How many of `words` form `First [Middle|Initial] Last`, or 0."""
    if len(words) < 2 or words[0] not in lexicon.first_names or len(words[0]) < 2:
        return 0
    for end in range(len(words), 1, -1):
        middle, final = words[1 : end - 1], words[end - 1]
        if len(final) < 2 or final not in lexicon.last_names:
            continue
        if not all(len(w) == 1 or w in lexicon.first_names or w in lexicon.last_names for w in middle):
            continue
        has_initial = any(len(w) == 1 for w in middle)
        if has_initial or not all(w in lexicon.not_names for w in [words[0], *middle, final] if len(w) > 1):
            return end
    return 0


_LAST_FIRST = re.compile(r"\b([A-Z][A-Za-z'-]+), ([A-Z][a-z'-]+)\b")


def _last_comma_first(text: str, lexicon: Lexicon) -> list[tuple[int, int]]:
    found = []
    for match in _LAST_FIRST.finditer(text):
        last, first = match.group(1).lower(), match.group(2).lower()
        plausible_last = last in lexicon.last_names and last not in lexicon.not_names and last not in lexicon.states
        if plausible_last and first in lexicon.first_names and first not in lexicon.not_names:
            found.append((match.start(), match.end()))
    return found


def find_locations(text: str, lexicon: Lexicon) -> list[tuple[int, int]]:
    """(start, end) of each city in `text` (states are kept: Safe Harbor allows them)."""
    tokens = _tokens(text)
    found: list[tuple[int, int]] = []
    for run in _runs(text):
        end_token = run[-1]
        after = text[tokens[end_token][1] : tokens[end_token][1] + 3]
        next_word = _key(tokens[end_token + 1][2]) if end_token + 1 < len(tokens) else ""
        before_state = after.startswith(", ") and (
            next_word in lexicon.states or tokens[end_token + 1][2].rstrip(".") in lexicon.states
            if end_token + 1 < len(tokens)
            else False
        )
        words = [_key(tokens[i][2]) for i in run]
        if before_state and " ".join(words) not in lexicon.states:
            # "Springfield, IL": the words before a state are a city, listed or not (up to 3).
            start = run[max(0, len(run) - 3)]
            while start < end_token and _key(tokens[start][2]) in PLACE_WORDS | TITLES | ROLE_WORDS:
                start += 1
            found.append((tokens[start][0], tokens[end_token][1]))
            continue
        place_cue = run[0] > 0 and _key(tokens[run[0] - 1][2]) in PLACE_WORDS
        if not place_cue:
            continue
        for length in range(min(len(words), lexicon.longest_city), 0, -1):
            name = " ".join(words[:length])
            end = tokens[run[length - 1]][1]
            if name in lexicon.cities and name not in NOT_PLACES and not followed_by_eponym_head(text, end):
                found.append((tokens[run[0]][0], end))
                break
    return found

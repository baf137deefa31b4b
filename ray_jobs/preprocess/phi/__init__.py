"""De-identification: find identifiers in a row's texts and replace them with typed tags.

`build_scrubber(recipe.data.phi)` gives the row scrubber of the configured engine
(`scrubber.py`); `patterns.py` holds the shape-defined types, `context.py` and `lexicon.py`
names and cities, `presidio_engine.py` the Presidio analyzer that runs them.
"""

from ray_jobs.preprocess.phi.patterns import PhiScrubber
from ray_jobs.preprocess.phi.scrubber import PhiEngineError, RowScrubber, build_scrubber

__all__ = ["PhiEngineError", "PhiScrubber", "RowScrubber", "build_scrubber"]

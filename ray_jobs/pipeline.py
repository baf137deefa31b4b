"""The stages chained, for entry points: `python -m ray_jobs.<stage>`, `medtune <stage>`, the
quickstart and the tests. A stage never calls another; the dataset a stage needs is made (or
reused: preprocess fingerprints its inputs) here and handed to it.

    dataset = preprocess(recipe)                     # Ray Data -> tokenised shards + stats
    result = train(recipe)                           # preprocess, then Ray Train
    report = evaluate(recipe, adapter="ner@v2")      # preprocess, then base vs adapter
"""

from __future__ import annotations

from typing import Any

from ray_jobs.core.artifacts import DatasetRef
from ray_jobs.core.recipe import Recipe
from ray_jobs.core.requirements import check_packages


def preprocess(recipe: Recipe) -> DatasetRef:
    from ray_jobs.preprocess.pipeline import main

    return main(recipe)


def train(recipe: Recipe, **options: Any):
    """The preprocessed dataset, then training (options: run_name, fault_at_step). Settings and
    cluster resources are checked first, so a bad recipe fails before Ray Data reads anything."""
    from ray_jobs.train.run import preflight, run

    preflight(recipe)
    return run(recipe, preprocess(recipe), **options)


def evaluate(recipe: Recipe, adapter: str | None = None) -> dict[str, Any]:
    """The preprocessed dataset, then evaluation; prints the headline figures."""
    from ray_jobs.evaluate.run import main

    check_packages(recipe, "evaluate")
    return main(recipe, preprocess(recipe), adapter)


def serve(recipe: Recipe):
    from ray_jobs.serve.deployment import main

    check_packages(recipe, "serve")
    return main(recipe)


STAGES = {"preprocess": preprocess, "train": train, "evaluate": evaluate, "serve": serve}

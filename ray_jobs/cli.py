"""The `medtune` command line, and the shared entry of `python -m ray_jobs.<stage>`.

    medtune validate RECIPE [--set key.path=value ...]
    medtune preprocess | train | evaluate | serve RECIPE [--set ...]
    medtune tiny-model --arch llama --out DIR
    medtune quickstart [--storage DIR]

Errors a user can fix (a bad recipe, missing data, too many rejects, an impossible
request) print one line per problem and exit with status 2; never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from ray_jobs.config import Recipe, RecipeError, load_recipe

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is the whole story for the user."""
    from ray_jobs.core.engines import EngineUnavailableError
    from ray_jobs.preprocess.pipeline import PreprocessError
    from ray_jobs.train.run import TrainError

    errors: list[type[BaseException]] = [RecipeError, PreprocessError, TrainError, FileNotFoundError,
                                         EngineUnavailableError]
    try:
        from ray_jobs.evaluate.run import EvaluateError

        errors.append(EvaluateError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _stage(name: str) -> Callable[[Recipe], object]:
    if name == "preprocess":
        from ray_jobs.preprocess.pipeline import main
    elif name == "train":
        from ray_jobs.train.run import main
    elif name == "evaluate":
        from ray_jobs.evaluate.run import main
    elif name == "serve":
        from ray_jobs.serve.deployment import main
    else:  # pragma: no cover - argparse restricts the names
        raise ValueError(name)
    return main


def _recipe_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="path to the recipe YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe value, e.g. --set train.lr=1e-4 (repeatable)")
    return parser


def _configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("MEDTUNE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray Data's progress bars are noise in job logs.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _fail(error: BaseException) -> int:
    for line in str(error).splitlines() or [type(error).__name__]:
        print(f"medtune: error: {line}", file=sys.stderr)
    return EXIT_USER_ERROR


def run_stage(name: str, argv: list[str] | None = None) -> int:
    """`python -m ray_jobs.<name> RECIPE [--set ...]`: load, validate and run one stage."""
    args = _recipe_parser(f"python -m ray_jobs.{name}", f"medtune {name} stage").parse_args(argv)
    _configure_logging()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        _stage(name)(recipe)
    except _user_errors() as error:
        return _fail(error)
    return 0


def cmd_validate(argv: list[str]) -> int:
    parser = _recipe_parser("medtune validate", "check a recipe and print it with defaults filled in")
    parser.add_argument("--quiet", action="store_true", help="print nothing when the recipe is valid")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        return _fail(error)
    if not args.quiet:
        from ray_jobs.config import recipe_to_yaml

        print(f"# {args.recipe}: valid")
        print(recipe_to_yaml(recipe), end="")
    return 0


def cmd_schema(argv: list[str]) -> int:
    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "validate": "check a recipe (names every bad key)",
        "schema": "print the recipe's JSON schema",
        "preprocess": "Ray Data: raw files -> tokenised, packed shards",
        "train": "Ray Train: LoRA / QLoRA / full fine-tuning",
        "evaluate": "task metrics before vs after, report.json + report.md + plots",
        "serve": "Ray Serve: OpenAI-compatible API over the base model and its adapters",
        "tiny-model": "build a tiny offline model with a chat template",
        "quickstart": "the whole pipeline on CPU with a tiny model, end to end",
        "submit": "run training on a Ray cluster (ray job submit) or as a KubeRay RayJob",
        "export": "merge an adapter into its base model, or combine adapters (linear, TIES, DARE)",
    }
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, commands))
        print("usage: medtune COMMAND [ARGS]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:<{width}}  {text}")
        return 0 if argv else EXIT_USER_ERROR
    command, rest = argv[0], argv[1:]
    if command == "validate":
        return cmd_validate(rest)
    if command == "schema":
        return cmd_schema(rest)
    if command in ("preprocess", "train", "evaluate", "serve"):
        return run_stage(command, rest)
    if command == "submit":
        from ray_jobs.submit import main as submit_main

        return submit_main(rest)
    if command == "export":
        from ray_jobs.export import main as export_main

        _configure_logging()
        return export_main(rest)
    if command == "tiny-model":
        from ray_jobs.tiny_model import main as tiny_main

        return tiny_main(rest)
    if command == "quickstart":
        from ray_jobs.quickstart import main as quickstart_main

        _configure_logging()
        try:
            return quickstart_main(rest)
        except _user_errors() as error:
            return _fail(error)
    print(f"medtune: error: unknown command {command!r}; run `medtune --help`", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())

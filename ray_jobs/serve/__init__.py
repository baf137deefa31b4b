"""Serving stage: an OpenAI-compatible Ray Serve app over one base model and its adapters.

    medtune serve RECIPE
    serve run ray_jobs.serve:app_builder recipe=RECIPE

`app_builder` is the import path RayService configs name. The parts: protocol (the OpenAI
request and response shapes), registry (adapter names, versions, downloads), engines (vLLM or
transformers + PEFT behind one protocol), admission and metrics, app (the routes) and
deployment (Serve options, start-up).
"""


def app_builder(args: dict[str, str]):
    """Build the Serve application from `{"recipe": PATH, ...overrides}` (see ray_jobs.serve.deployment)."""
    from ray_jobs.serve.deployment import app_builder as build

    return build(args)

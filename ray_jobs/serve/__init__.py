"""Serving stage: an OpenAI-compatible Ray Serve app over one base model and its adapters.

    medtune serve RECIPE
    serve run ray_jobs.serve:app_builder recipe=RECIPE

`app_builder` is the import path RayService configs name.
"""


def app_builder(args: dict[str, str]):
    """Build the Serve application from `{"recipe": PATH, ...overrides}` (see ray_jobs.serve.app)."""
    from ray_jobs.serve.app import app_builder as build

    return build(args)

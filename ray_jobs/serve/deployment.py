"""Deploying the serving app: Serve options from the recipe, and the ways to start it.

medtune serve RECIPE                                   # blocks; Ctrl-C stops it
serve run ray_jobs.serve:app_builder recipe=RECIPE      # Ray's own CLI
# RayService: import_path ray_jobs.serve:app_builder, args {recipe: /etc/medtune/recipe.yaml}
"""

from __future__ import annotations

from typing import Any

from ray import serve

from ray_jobs.core.recipe import Recipe, load_recipe


def routing_cap(admission_limit: int) -> int:
    """How many requests Serve may route to one replica, and queue: far more than a replica
    admits, so a burst's excess reaches the replica and is refused in JSON; Serve's proxy
    (plain-text 503) refuses only past that."""
    return max(1024, 4 * admission_limit)


def deployment_options(recipe: Recipe) -> dict[str, Any]:
    """Serve deployment options from serve.*: replicas, autoscaling, queue bound, JSON logs."""
    cfg = recipe.serve
    options: dict[str, Any] = dict(
        # Every request reaches a replica, which admits or refuses it itself (Admission): Serve's
        # own cap and router queue would refuse in plain text (and its queue fills for a moment
        # on any burst, while the router assigns replicas). Its backpressure stays as a last
        # resort with the same Retry-After.
        max_ongoing_requests=routing_cap(cfg.max_ongoing_requests + cfg.max_queued_requests),
        max_queued_requests=routing_cap(cfg.max_ongoing_requests + cfg.max_queued_requests),
        backpressure_config={"status_code": 503, "retry_after_s": cfg.retry_after_s},
        ray_actor_options={"num_gpus": cfg.gpus_per_replica, "num_cpus": cfg.cpus_per_replica},
        logging_config={"encoding": "JSON", "enable_access_log": True},
    )
    if cfg.max_replicas > cfg.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = max(cfg.min_replicas, 1)
    return options


def build_app(recipe: Recipe):
    """The Serve application for a recipe, with its autoscaling and queue settings."""
    from ray_jobs.serve.app import MedtuneServer

    return MedtuneServer.options(**deployment_options(recipe)).bind(recipe.model_dump(mode="json"))


def app_builder(args: dict[str, str]):
    """Entry for `serve run ray_jobs.serve:app_builder recipe=PATH` and RayService configs."""
    overrides = [f"{k}={v}" for k, v in args.items() if k != "recipe"]
    return build_app(load_recipe(args["recipe"], overrides))


def start(recipe: Recipe, *, blocking: bool = False, app_name: str = "medtune"):
    """Start Serve's HTTP proxy on the recipe's host/port and deploy the app; returns its handle."""
    import ray

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": recipe.serve.host, "port": recipe.serve.port})
    return serve.run(build_app(recipe), name=app_name, route_prefix=recipe.serve.route_prefix, blocking=blocking)


def main(recipe: Recipe) -> None:
    print(
        f"[medtune] serving {recipe.model.base} and adapters from {recipe.storage.root} "
        f"on http://{recipe.serve.host}:{recipe.serve.port}",
        flush=True,
    )
    start(recipe, blocking=True)

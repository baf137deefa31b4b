"""`python -m ray_jobs.evaluate RECIPE [--set key.path=value ...]`."""

from ray_jobs.cli import run_stage

raise SystemExit(run_stage("evaluate"))

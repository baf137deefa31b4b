"""Evaluation stage: task metrics before (base) vs after (adapter), with reports and plots.

    python -m ray_jobs.evaluate RECIPE

`ray_jobs.evaluate.run` runs the models; `ray_jobs.evaluate.metrics` holds the pure metric functions.
"""

"""medtune: medical LLM fine-tuning on Ray, one YAML recipe from laptop to Kubernetes.

The stages, in pipeline order, each runnable as `python -m ray_jobs.<stage> RECIPE`:
preprocess -> train -> evaluate -> serve. `ray_jobs.core.recipe` holds the recipe schema,
`ray_jobs.core.storage` the local/S3 layer every stage writes through.
"""

__version__ = "0.1.0"

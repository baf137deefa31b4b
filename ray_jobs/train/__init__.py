"""Training stage: LoRA / QLoRA / full fine-tuning on Ray Train.

    python -m ray_jobs.train RECIPE [--set key.path=value ...]

`ray_jobs.train.run` is the driver (checks, TorchTrainer, adapter publishing);
`ray_jobs.train.loop` is what every worker runs.
"""

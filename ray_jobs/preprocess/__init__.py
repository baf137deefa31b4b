"""Preprocessing stage: raw JSONL/JSON/Parquet/CSV -> tokenised, packed shards (Ray Data).

    python -m ray_jobs.preprocess RECIPE [--set key.path=value ...]

The pipeline lives in `ray_jobs.preprocess.pipeline`; `formats` converts records to
conversations, `clean` and `phi` clean and scrub text, `tokenize` masks and packs.
"""

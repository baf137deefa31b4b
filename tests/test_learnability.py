"""The pipeline learns: preprocess -> train -> evaluate on a learnable synthetic entity task.

The guard against masking, template, packing and data-order bugs that tests of single
functions miss: the tiny model, trained through the real stages on a local Ray cluster, must
extract the entities of held-out notes (new combinations of values) far better than before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_jobs import pipeline
from ray_jobs.core.recipe import parse_recipe
from ray_jobs.synthetic import entity_rows

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def test_training_teaches_the_tiny_model_to_extract_entities_from_unseen_notes(tmp_path: Path):
    train_file, eval_file = tmp_path / "train.json", tmp_path / "heldout.json"
    train_file.write_text(json.dumps(entity_rows(3000, seed=7)))
    eval_file.write_text(json.dumps(entity_rows(40, seed=99)))  # other combinations, same vocabulary
    recipe = parse_recipe(
        {
            "name": "learnability",
            "model": {"base": "tiny:llama"},
            # Exact dedupe stays off: the synthetic generator repeats the sentences of its small
            # templates (96 combinations each) by construction, and dedupe kept 1,661 of 3,040 rows,
            # mostly from the large templates; the small ones were then seen ~5x less and
            # held-out F1 reached only 0.71-0.74. Dedupe has its own tests.
            "data": {
                "format": "entities",
                "train": [str(train_file)],
                "eval": [str(eval_file)],
                "system_prompt": "Extract the entities as JSON.",
                "max_seq_len": 512,
                "clean": {"dedupe": False},
            },
            # The copy of entity values is learned in a sudden drop of the loss (about 0.1 -> 0.02)
            # whose timing varies from run to run: at 400 steps and lr 2e-3 one run got there
            # (F1 0.98) and one stalled on the plateau (0.66); at 600 steps and lr 3e-3, F1 1.00
            # (0.97 at lr 2e-3), the drop done by step 400.
            "train": {
                "method": "full",
                "max_steps": 600,
                "micro_batch_size": 4,
                "lr": 3e-3,
                "scheduler": "cosine",
                "warmup_steps": 5,
                "checkpoint_every": 600,
                "log_every": 50,
                "cpus_per_worker": 1,
            },
            "eval": {"metrics": ["entities"], "max_samples": 24, "batch_size": 8, "generation": {"max_new_tokens": 80}},
            "storage": {"root": str(tmp_path / "storage")},
        }
    )
    pipeline.train(recipe)
    report = pipeline.evaluate(recipe)
    before = report["models"]["base"]["entities"]["exact"]["f1"]
    after = report["models"]["adapter"]["entities"]["exact"]["f1"]
    assert before < 0.05
    # Measured through this path: 1.00 (600 steps, lr 3e-3, 2 cores). A masking, template,
    # packing or data-order bug drops F1 to 0.0-0.2 (measured in session 2), far below the bar.
    assert after >= 0.9, f"held-out exact entity F1 {after:.2f} after training (before: {before:.2f})"

"""The README's main command: the whole pipeline end to end, offline, on CPU.

Runs `medtune quickstart` as a user would (a fresh process that starts its own local Ray)
and checks what it promises: every stage's output in storage and a completion that the
trained adapter returned over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
MEDTUNE = Path(sys.executable).parent / "medtune"


@pytest.mark.slow
@pytest.mark.integration
def test_quickstart_runs_every_stage_and_answers_over_http(tmp_path):
    storage = tmp_path / "out"
    env = {**os.environ, "MEDTUNE_CACHE": str(tmp_path / "cache"), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)  # the quickstart must start its own local Ray
    completed = subprocess.run(
        [str(MEDTUNE), "quickstart", "--storage", str(storage), "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]

    for stage in ("1/5 preprocess", "2/5 train", "3/5 evaluate", "4/5 serve", "5/5 ask the adapter"):
        assert f"== {stage}" in completed.stdout
    completion_lines = [line for line in completed.stdout.splitlines() if line.strip().startswith("completion:")]
    assert len(completion_lines) == 1
    usage = next(line for line in completed.stdout.splitlines() if line.strip().startswith("usage:"))
    assert "'completion_tokens': " in usage and "'completion_tokens': 0" not in usage

    datasets = list((storage / "datasets" / "quickstart-ner").iterdir())
    assert len(datasets) == 1 and (datasets[0] / "_COMPLETE").exists()
    stats = json.loads((datasets[0] / "stats.json").read_text())
    assert stats["rows_out"]["train"] > 0 and stats["rows_out"]["eval"] > 0

    versions = list((storage / "adapters" / "quickstart-ner").iterdir())
    assert len(versions) == 1
    adapter = versions[0]
    for name in ("_COMPLETE", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "lineage.json"):
        assert (adapter / name).exists(), name
    lineage = json.loads((adapter / "lineage.json").read_text())
    assert lineage["base_model"] == "tiny:llama" and lineage["dataset_fingerprint"] == datasets[0].name
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny:llama"

    report = json.loads((storage / "reports" / f"quickstart-ner-{adapter.name}" / "report.json").read_text())
    # Training on the task must lower the eval loss against the untouched base model.
    assert report["models"]["adapter"]["eval_loss"] < report["models"]["base"]["eval_loss"]
    # The report carries the training run's loss curves, read back from its TensorBoard logs.
    report_dir = storage / "reports" / f"quickstart-ner-{adapter.name}"
    curves = report["training_curves"]
    assert len(curves["loss"]) >= 2 and len(curves["eval_loss"]) >= 2
    steps = [step for step, _ in curves["loss"]]
    assert steps == sorted(steps) and steps[-1] == lineage["final_metrics"]["step"]
    assert curves["eval_loss"][-1][1] == pytest.approx(lineage["final_metrics"]["eval_loss"], rel=1e-4)
    assert (report_dir / "loss_curves.png").is_file() and "loss_curves.png" in (report_dir / "report.md").read_text()

"""The evaluation stage end to end on a published adapter (local Ray cluster, tiny model).

The eval rows are split over Ray tasks (`eval.workers`): the report must not depend on how
many, and every file the entity-extraction seed asks for must be written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_adapter
from ray_jobs.core.artifacts import AdapterNotFoundError
from ray_jobs.core.recipe import parse_recipe
from ray_jobs.core.storage import Storage, adapter_prefix
from ray_jobs.pipeline import evaluate
from ray_jobs.synthetic import entity_rows

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]


def recipe_for(tmp_path: Path, tiny_llama_dir: Path, **eval_options):
    notes, heldout = tmp_path / "notes.json", tmp_path / "heldout.json"
    if not notes.exists():
        notes.write_text(json.dumps(entity_rows(8, seed=3)))
        heldout.write_text(json.dumps(entity_rows(8, seed=5)))
    return parse_recipe(
        {
            "name": "eval-test",
            "model": {"base": str(tiny_llama_dir)},
            "data": {
                "format": "entities",
                "train": [str(notes)],
                "eval": [str(heldout)],
                "system_prompt": "Extract the entities as JSON.",
            },
            "eval": {"metrics": ["entities"], "batch_size": 1, "generation": {"max_new_tokens": 12}, **eval_options},
            "storage": {"root": str(tmp_path / "storage")},
        }
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_llama_dir):
    tmp_path = tmp_path_factory.mktemp("evaluate")
    storage = Storage.from_uri(str(tmp_path / "storage"))
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", seed=4, rank=4)
    storage.upload_dir(adapter, adapter_prefix("eval-test", "v1"))
    return tmp_path


def test_the_report_is_the_same_whether_one_or_two_ray_tasks_evaluate(published, tiny_llama_dir, capsys):
    one = evaluate(recipe_for(published, tiny_llama_dir, workers=1))
    assert "Ray tasks" not in capsys.readouterr().out
    pairs_one = json.loads((Path(one["uri"]) / "true_pred_entities.json").read_text())
    two = evaluate(recipe_for(published, tiny_llama_dir, workers=2))
    pairs_two = json.loads((Path(two["uri"]) / "true_pred_entities.json").read_text())
    assert "evaluating 8 rows in 2 Ray tasks" in capsys.readouterr().out

    assert one["eval_rows"] == two["eval_rows"] == 8
    for label in ("base", "adapter"):
        assert two["models"][label]["eval_loss"] == pytest.approx(one["models"][label]["eval_loss"], rel=1e-6)
        assert two["models"][label]["entities"] == one["models"][label]["entities"]
    assert [p["raw_output"] for p in pairs_two] == [p["raw_output"] for p in pairs_one]
    assert one["models"]["adapter"]["eval_loss"] != one["models"]["base"]["eval_loss"]  # the adapter was applied
    assert one["models"]["adapter"]["generation_engine"] == "hf"  # eval.engine auto without a GPU
    report_dir = Path(two["uri"])
    for name in ("report.json", "report.md", "before_after.png", "performance.json", "true_pred_entities.json"):
        assert (report_dir / name).is_file(), name
    assert "average_inference_time_s" in json.loads((report_dir / "performance.json").read_text())
    # The report shows real answers: the first rows' prompt, reference and both models' answers,
    # the very outputs the metrics were computed from.
    samples = two["samples"]
    assert [s["row_id"] for s in samples] == [p["row_id"] for p in pairs_two[: len(samples)]] and len(samples) == 5
    assert [s["adapter"] for s in samples] == [p["raw_output"] for p in pairs_two[:5]]
    assert all(s["prompt"] == p["text"] for s, p in zip(samples, pairs_two))
    markdown = (report_dir / "report.md").read_text()
    assert "## Sample answers" in markdown
    for sample in samples:
        assert f"> {sample['prompt']}" in markdown and "Base model:" in markdown and "Adapter model:" in markdown


def test_a_missing_adapter_names_the_ones_that_exist(published, tiny_llama_dir):
    with pytest.raises(AdapterNotFoundError, match="eval-test"):
        evaluate(recipe_for(published, tiny_llama_dir), adapter="no-such-adapter")


def test_asking_for_vllm_where_it_cannot_run_says_why(published, tiny_llama_dir):
    from ray_jobs.core.engines import EngineUnavailableError

    with pytest.raises(EngineUnavailableError, match="engine vllm cannot run here: vLLM is not installed"):
        evaluate(recipe_for(published, tiny_llama_dir, workers=1, engine="vllm"))

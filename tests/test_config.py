"""The recipe schema: every shipped recipe loads, and every mistake is named by its key path.

A recipe error must tell the user which key to change, what they wrote and what is allowed,
all problems at once, and never as a stack trace.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs.core.recipe import Recipe, RecipeError, StorageConfig, apply_overrides, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart" / "tiny-llama-lora.yaml"
MEDTUNE = Path(sys.executable).parent / "medtune"
SHIPPED_RECIPES = sorted(
    path for path in (REPO / "configs").rglob("*.y*ml") if "deepspeed" not in path.relative_to(REPO / "configs").parts
)

MINIMAL = {"name": "unit-recipe", "model": {"base": "tiny:llama"}, "data": {"format": "qa", "train": "qa.jsonl"}}


def recipe_with(**sections: dict) -> dict:
    """The minimal valid recipe with some sections merged in (one level deep)."""
    raw = copy.deepcopy(MINIMAL)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return raw


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(raw)
    return caught.value.problems


# --------------------------------------------------------------------------- shipped recipes
def test_the_quickstart_recipe_loads_with_its_documented_values():
    recipe = load_recipe(QUICKSTART)
    assert recipe.name == "quickstart-ner"
    assert recipe.model.base == "tiny:llama"
    assert recipe.data.format == "entities"
    assert recipe.train.lr == pytest.approx(3.0e-3)  # "3.0e-3" in YAML is a number, not a string
    assert isinstance(recipe.train.lr, float)
    assert recipe.eval.metrics == ["perplexity", "entities"]


def test_the_repository_ships_recipes():
    assert QUICKSTART in SHIPPED_RECIPES


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_is_valid(path: Path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)


def test_the_minimal_recipe_fills_in_defaults():
    recipe = parse_recipe(copy.deepcopy(MINIMAL))
    assert recipe.data.train == ["qa.jsonl"]  # a single path becomes a list
    assert recipe.data.max_reject_fraction == 0.05
    assert recipe.data.phi.enabled is True  # PHI scrubbing is on unless switched off
    assert recipe.train.method == "lora"


# --------------------------------------------------------------------------- key-path errors
def test_an_unknown_key_is_rejected_naming_its_path():
    problems = problems_of(recipe_with(train={"lrr": 1e-4}))
    assert len(problems) == 1
    assert problems[0].startswith("train.lrr: unknown key")


def test_an_unknown_nested_key_names_the_full_path():
    problems = problems_of(recipe_with(data={"clean": {"dedup": False}}))
    assert [p.split(":")[0] for p in problems] == ["data.clean.dedup"]
    assert "unknown key" in problems[0]


def test_an_unknown_top_level_section_is_rejected():
    raw = recipe_with()
    raw["trainer"] = {"lr": 1}
    (problem,) = problems_of(raw)
    assert problem.startswith("trainer: unknown key")


def test_a_bad_value_names_the_key_the_value_and_what_is_allowed():
    (problem,) = problems_of(recipe_with(train={"scheduler": "cosin"}))
    assert problem.startswith("train.scheduler: ")
    assert "'cosin'" in problem
    for allowed in ("'linear'", "'cosine'", "'constant'"):
        assert allowed in problem


def test_a_missing_required_key_is_named():
    raw = recipe_with()
    del raw["data"]["format"]
    assert problems_of(raw) == ["data.format: required key is missing"]


def test_every_problem_is_reported_at_once():
    raw = recipe_with(name="Bad Name", train={"lr": -1, "epochs": 0, "lrr": 2}, data={"eval_fraction": 1.5})
    problems = problems_of(raw)
    assert sorted(p.split(":")[0] for p in problems) == [
        "data.eval_fraction",
        "name",
        "train.epochs",
        "train.lr",
        "train.lrr",
    ]
    assert all("\n" not in p for p in problems)


def test_the_error_message_has_one_line_per_problem_prefixed_by_the_source():
    with pytest.raises(RecipeError) as caught:
        parse_recipe(recipe_with(train={"lr": 0, "epochs": 0}), source="my.yaml")
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith("my.yaml: train.") for line in lines)


def test_tiny_models_are_limited_to_the_two_built_in_architectures():
    (problem,) = problems_of(recipe_with(model={"base": "tiny:gpt2"}))
    assert problem.startswith("model.base: ") and "tiny:llama or tiny:qwen2" in problem


def test_a_reasoning_template_must_keep_both_placeholders():
    (problem,) = problems_of(recipe_with(data={"reasoning_template": "## Thinking {cot}"}))
    assert problem.startswith("data.reasoning_template: ") and "{response}" in problem


# --------------------------------------------------------------------------- cross-field rules
def test_zero3_with_8bit_weights_names_the_deepspeed_key():
    problems = problems_of(
        recipe_with(model={"quantization": "8bit"}, train={"deepspeed": "zero3", "gpus_per_worker": 1})
    )
    assert len(problems) == 1
    assert problems[0].startswith("train.deepspeed: zero3 cannot shard 8-bit weights")


def test_full_fine_tuning_of_quantised_weights_names_the_method_key():
    problems = problems_of(recipe_with(model={"quantization": "4bit"}, train={"method": "full"}))
    assert len(problems) == 1
    assert problems[0].startswith("train.method: full fine-tuning cannot update 4bit")


@pytest.mark.parametrize(
    ("metric", "needed"), [("entities", "entities"), ("format", "reasoning"), ("sdtm", "instruction")]
)
def test_a_task_metric_needs_its_data_format(metric: str, needed: str):
    (problem,) = problems_of(recipe_with(eval={"metrics": ["perplexity", metric]}))
    assert problem.startswith(f"eval.metrics: {metric} needs data.format: {needed}")
    assert "(this recipe has qa)" in problem


def test_the_audience_metric_needs_to_know_each_rows_audience():
    (problem,) = problems_of(recipe_with(eval={"metrics": ["perplexity", "audience"]}))
    assert problem.startswith("eval.metrics: audience needs data.audience")
    with_audience = recipe_with(eval={"metrics": ["audience"]})
    with_audience["data"]["audience"] = {"default": "patient", "prompts": {"patient": "Use plain words."}}
    assert parse_recipe(with_audience).eval.metrics == ["audience"]


def test_several_cross_field_problems_are_reported_together():
    problems = problems_of(
        recipe_with(model={"quantization": "8bit"}, train={"deepspeed": "zero3"}, eval={"metrics": ["entities"]})
    )
    assert sorted(p.split(":")[0] for p in problems) == ["eval.metrics", "model.quantization", "train.deepspeed"]


def test_a_single_cross_field_problem_is_reported_without_a_bogus_value():
    (problem,) = problems_of(recipe_with(model={"quantization": "4bit"}, train={"method": "full"}))
    assert not problem.endswith("(got dict)")


def test_unservable_lora_modules_are_refused_unless_explicitly_allowed():
    (problem,) = problems_of(recipe_with(lora={"modules_to_save": ["lm_head"]}))
    assert problem.startswith("lora: modules_to_save ['lm_head'] cannot be served by vLLM")
    assert "lora.allow_unservable_modules: true" in problem
    recipe = parse_recipe(recipe_with(lora={"modules_to_save": ["lm_head"], "allow_unservable_modules": True}))
    assert recipe.lora.modules_to_save == ["lm_head"]


def test_serve_replica_bounds_are_checked():
    (problem,) = problems_of(recipe_with(serve={"min_replicas": 3, "max_replicas": 1}))
    assert problem.startswith("serve: min_replicas (3) exceeds max_replicas (1)")


@pytest.mark.parametrize(
    "section",
    [{"lora": {"modules_to_save": ["lm_head"]}}, {"serve": {"min_replicas": 3, "max_replicas": 1}}],
    ids=["lora", "serve"],
)
def test_a_section_rule_is_reported_without_a_bogus_value(section: dict):
    (problem,) = problems_of(recipe_with(**section))
    assert not problem.endswith("(got dict)")


def test_a_valid_combination_passes_the_cross_checks():
    recipe = parse_recipe(
        recipe_with(
            model={"quantization": "4bit"},
            train={"deepspeed": "zero3"},
            data={"format": "entities"},
            eval={"metrics": ["entities"]},
        )
    )
    assert recipe.train.deepspeed == "zero3"


# --------------------------------------------------------------------------- storage root
@pytest.mark.parametrize(
    "root",
    [
        "./medtune-output",
        "/abs/dir",
        "s3://my-bucket",
        "s3://my-bucket/prefix/x",
        "s3://abc",
        "s3://a.b-c.d",
        "s3://" + "a" * 63,
    ],
)
def test_storage_accepts_local_directories_and_valid_bucket_names(root: str):
    assert StorageConfig(root=root).root == root


@pytest.mark.parametrize(
    "root",
    [
        "s3://AB-upper",
        "s3://ab",
        "s3://-leading-dash",
        "s3://trailing-dash-",
        "s3://under_score",
        "s3://" + "a" * 64,
        "s3:///no-bucket",
    ],
)
def test_storage_rejects_invalid_bucket_names(root: str):
    (problem,) = problems_of(recipe_with(storage={"root": root}))
    assert problem.startswith("storage.root: bucket ")
    assert "is not a valid S3 bucket name" in problem


def test_storage_rejects_other_url_schemes():
    (problem,) = problems_of(recipe_with(storage={"root": "gs://bucket/x"}))
    assert problem.startswith("storage.root: must be a local directory or an s3:// URI")


# --------------------------------------------------------------------------- --set overrides
def test_an_override_of_a_learning_rate_becomes_a_float():
    recipe = load_recipe(QUICKSTART, ["train.lr=1e-4"])
    assert isinstance(recipe.train.lr, float)
    assert recipe.train.lr == 1e-4


def test_an_override_reaches_nested_sections_and_parses_yaml_values():
    recipe = load_recipe(QUICKSTART, ["data.clean.dedupe=false", "eval.metrics=[perplexity]", "train.epochs=3"])
    assert recipe.data.clean.dedupe is False
    assert recipe.eval.metrics == ["perplexity"]
    assert recipe.train.epochs == 3
    assert recipe.data.clean.strip_html is True  # siblings of the overridden key are kept


def test_an_override_creates_a_section_the_file_does_not_have():
    raw = apply_overrides({"name": "x"}, ["serve.port=9000"])
    assert raw == {"name": "x", "serve": {"port": 9000}}


def test_an_override_without_equals_sign_is_an_error():
    with pytest.raises(RecipeError) as caught:
        load_recipe(QUICKSTART, ["train.lr"])
    assert caught.value.problems == ["--set train.lr: expected key.path=value"]


def test_an_override_through_a_value_is_an_error():
    with pytest.raises(RecipeError) as caught:
        load_recipe(QUICKSTART, ["train.lr.x=1"])
    assert caught.value.problems == ["--set train.lr.x: lr is not a section"]


def test_an_overridden_misspelt_key_is_still_rejected():
    with pytest.raises(RecipeError) as caught:
        load_recipe(QUICKSTART, ["train.lrr=1e-4"])
    assert [p.split(":")[0] for p in caught.value.problems] == ["train.lrr"]


# --------------------------------------------------------------------------- files
def test_a_yaml_syntax_error_names_its_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel:\n  base: tiny:llama: oops\ndata:\n  format: qa\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    (problem,) = caught.value.problems
    assert problem.startswith("not valid YAML at line 3")
    assert caught.value.source == str(path)


def test_a_missing_recipe_file_is_a_recipe_error(tmp_path: Path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "nope.yaml")
    assert caught.value.problems == [f"recipe file not found: {tmp_path / 'nope.yaml'}"]


def test_a_recipe_that_is_not_a_mapping_is_rejected(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert caught.value.problems == ["the recipe must be a mapping of sections, got list"]


# --------------------------------------------------------------------------- medtune validate
def medtune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(MEDTUNE), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_medtune_validate_accepts_the_quickstart_and_prints_it_with_defaults():
    result = medtune("validate", "configs/quickstart/tiny-llama-lora.yaml", "--set", "train.lr=1e-4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# configs/quickstart/tiny-llama-lora.yaml: valid\n")
    assert "lr: 0.0001\n" in result.stdout
    assert "max_reject_fraction: 0.05" in result.stdout  # a default the file does not set


def test_medtune_validate_reports_each_problem_on_one_line_and_exits_2(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        QUICKSTART.read_text().replace("  lr: 3.0e-3", "  lrr: 3.0e-3").replace("format: entities", "format: entity")
    )
    result = medtune("validate", str(path), "--set", "lora.r=0")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"medtune: error: {path}: ") for line in lines)
    assert sorted(line.split(": ")[3] for line in lines) == ["data.format", "lora.r", "train.lrr"]
    assert "Traceback" not in result.stderr


def test_medtune_validate_reports_a_yaml_syntax_error_without_a_trace(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel:\n  base: tiny:llama: oops\n")
    result = medtune("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"medtune: error: {path}: not valid YAML at line 3")
    assert "Traceback" not in result.stderr


def test_medtune_validate_reports_a_bad_override_syntax():
    result = medtune("validate", "configs/quickstart/tiny-llama-lora.yaml", "--set", "train.lr")
    assert result.returncode == 2
    assert result.stderr == "medtune: error: --set train.lr: expected key.path=value\n"

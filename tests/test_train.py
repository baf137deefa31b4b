"""Training on Ray Train: what a run leaves behind, and the traps of the LoRA/QLoRA/ZeRO stack.

Every run here is a real `TorchTrainer` on the session's local Ray cluster with the tiny
Llama model, so these tests are slow-ish (tens of seconds each on 2 cores). Checks that need
no Ray (packing equivalence, refusals) live at the top and run in milliseconds.

The runs on local storage share one notes file, storage root and recipe name (`local_runs`),
so Ray Data preprocesses the notes once and every later run reuses that dataset by its
fingerprint; each run keeps its own run name, checkpoints and adapter version.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ray_jobs import pipeline
from ray_jobs.core.modeling import collate, summed_loss
from ray_jobs.core.recipe import parse_recipe, recipe_to_yaml
from ray_jobs.core.requirements import MissingPackageError, check_packages
from ray_jobs.core.storage import Storage, adapter_prefix, run_prefix
from ray_jobs.synthetic import entity_rows
from ray_jobs.train import run as train_run
from ray_jobs.train.checkpointing import ADAPTER_DIR, STATE_FILE
from ray_jobs.train.identity import RunConflictError, default_run_name
from ray_jobs.train.tracking import METRICS_FILE, TensorboardFolder

SYSTEM = "Extract the entities from the text as JSON."


def notes_file(directory: Path, rows: int = 64, seed: int = 3) -> Path:
    path = directory / "notes.json"
    path.write_text(json.dumps(entity_rows(rows, seed=seed)))
    return path


def tiny_recipe(
    name: str,
    data_file: Path,
    root: str,
    *,
    train: dict | None = None,
    model: dict | None = None,
    lora: dict | None = None,
):
    return parse_recipe(
        {
            "name": name,
            "model": {"base": "tiny:llama", **(model or {})},
            "data": {"format": "entities", "train": [str(data_file)], "system_prompt": SYSTEM, "max_seq_len": 256},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "attention", **(lora or {})},
            "train": {
                "max_steps": 4,
                "micro_batch_size": 2,
                "checkpoint_every": 2,
                "log_every": 1,
                "cpus_per_worker": 0.5,
                **(train or {}),
            },
            "storage": {"root": root},
        }
    )


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def checkpoint_dirs(storage: Storage, run: str, scratch: Path) -> dict[int, Path]:
    """Step -> local copy of every checkpoint the run kept."""
    found = {}
    for name in storage.listdir(run_prefix(run)):
        if not name.startswith("checkpoint_") or name.endswith(".json"):  # skip Ray's manager snapshot
            continue
        local = Path(storage.download_dir(f"{run_prefix(run)}/{name}", scratch / name))
        state = torch.load(local / STATE_FILE, map_location="cpu", weights_only=False)
        found[state["position"]["step"]] = local
    return found


# --------------------------------------------------------------------------- no Ray needed
def test_packed_documents_score_exactly_like_the_same_documents_one_by_one(tiny_llama_dir: Path):
    """Position ids restarting per document make transformers mask across documents, so a
    packed row's loss equals the sum of its documents' losses; naive packing does not."""
    from transformers import AutoModelForCausalLM

    from ray_jobs.preprocess.tokenize import pack_documents

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    docs = []
    for length in (37, 61, 18, 90):
        ids = torch.randint(5, 600, (length,)).tolist()
        labels = [-100] * (length // 3) + ids[length // 3 :]
        docs.append((ids, labels))
    (row,) = pack_documents(docs, max_seq_len=256)

    def loss_of(rows) -> tuple[float, int]:
        with torch.no_grad():
            total, count = summed_loss(model, *collate(rows, pad_id=0))
        return float(total), count

    packed = loss_of({k: [row[k]] for k in ("input_ids", "labels", "position_ids")})
    one_by_one = [loss_of({"input_ids": [d[0]], "labels": [d[1]]}) for d in docs]
    # Documents start with masked prompt tokens (as every templated conversation does), so no
    # target is ever predicted from across a boundary and the counts match exactly.
    assert packed[1] == sum(n for _, n in one_by_one)
    assert packed[0] == pytest.approx(sum(t for t, _ in one_by_one), rel=1e-4)

    naive = dict(
        input_ids=[row["input_ids"]], labels=[row["labels"]], position_ids=[list(range(len(row["input_ids"])))]
    )
    plain = sum(t for t, _ in one_by_one)
    # A random tiny model attends almost uniformly, so leaking attention moves the loss only a
    # little; it must still move it far more than the packed path's float rounding does.
    assert abs(loss_of(naive)[0] - plain) > 20 * abs(packed[0] - plain) + 1e-2, (
        "cross-document attention went unnoticed"
    )


def metrics_folder(tmp_path: Path) -> TensorboardFolder:
    """The worker's TensorBoard folder, where metrics.jsonl is written, and its storage copy."""
    return TensorboardFolder(
        local_dir=str(tmp_path / "worker" / "tensorboard"),
        storage_root=str(tmp_path / "store"),
        storage_rel="runs/r1/tensorboard",
    )


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resumed_run_logs_each_step_once_in_metrics_jsonl(tmp_path: Path):
    """The failed attempt logged past its last checkpoint (and tore a line as it died); the
    resumed attempt logs those steps again, and they must not stand there twice."""
    from ray_jobs.train.tracking import append_metrics, resume_metrics

    folder = metrics_folder(tmp_path)
    path = folder.metrics_path
    for step in range(1, 6):
        append_metrics(path, {"step": step, "loss": 2.0 - step / 10})
    with open(path, "a") as handle:
        handle.write('{"step": 6, "lo')
    resume_metrics(folder, 3)  # the checkpoint the restart found was step 3's
    for step in range(4, 7):
        append_metrics(path, {"step": step, "loss": 1.5, "resumed_from_step": 3})
    assert logged_steps(path) == [1, 2, 3, 4, 5, 6]
    assert [json.loads(line).get("resumed_from_step") for line in path.read_text().splitlines()][2:4] == [None, 3]


def test_a_run_resumed_on_another_node_continues_the_metrics_synced_to_storage(tmp_path: Path):
    from ray_jobs.train.tracking import metrics_line, resume_metrics

    folder = metrics_folder(tmp_path)
    synced = "".join(metrics_line({"step": step, "loss": 1.0}) for step in range(1, 5))
    Storage.from_uri(folder.storage_root).write_text(f"{folder.storage_rel}/{METRICS_FILE}", synced)
    resume_metrics(folder, 2)  # this node never held the file
    assert logged_steps(folder.metrics_path) == [1, 2]


def test_a_diverged_loss_is_logged_as_null_in_valid_json(tmp_path: Path):
    from ray_jobs.train.tracking import append_metrics

    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4, "final": False})

    def not_json(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    (line,) = path.read_text().splitlines()
    assert json.loads(line, parse_constant=not_json) == {
        "step": 1,
        "loss": None,
        "grad_norm": None,
        "lr": 1e-4,
        "final": False,
    }


def trainer_plan(tmp_path: Path, model_dir: Path, **fault):
    from ray_jobs.train.plan import WorkerPlan

    recipe = tiny_recipe("x", tmp_path / "notes.json", str(tmp_path), train={"max_steps": 2, "lr": 1e-2})
    return WorkerPlan(
        recipe=recipe, model_dir=str(model_dir), total_steps=2, pad_id=0, has_eval=False, run_name="x-r1", **fault
    )


def test_the_worker_plan_pickles_with_its_typed_recipe(tmp_path: Path, tiny_llama_dir: Path):
    import pickle

    plan = trainer_plan(tmp_path, tiny_llama_dir)
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and again.recipe.train.max_steps == 2 and not again.zero3


def test_the_trainer_steps_outside_ray_train_as_benchmarks_call_it(tmp_path: Path, tiny_llama_dir: Path):
    """One micro-batch of packed rows per optimizer step; the first steps lower the loss of
    the batch they keep seeing."""
    from ray_jobs.preprocess.tokenize import pack_documents
    from ray_jobs.train.trainer import Trainer, WorkerContext

    trainer = Trainer(
        trainer_plan(tmp_path, tiny_llama_dir), WorkerContext(rank=0, world=1, device=torch.device("cpu"))
    )
    trainer.setup()
    docs = [
        ([5 + (i + j) % 50 for j in range(40)], [-100] * 10 + [5 + (i + j) % 50 for j in range(10, 40)])
        for i in range(4)
    ]
    rows = pack_documents(docs, max_seq_len=256)
    batch = {k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids")}
    first, second = trainer.step([batch]), trainer.step([batch])
    assert trainer.position.step == 2 and trainer.position.micro_batches == 2
    assert first.target_tokens == 4 * 30 and first.real_tokens == 4 * 40 and first.grad_norm > 0
    assert second.loss < first.loss


def publish_random_adapter(root: Path, model_dir: Path, name: str, *, r: int = 4) -> None:
    """A LoRA adapter with non-zero (random) weights, published as adapters/<name>/v1."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.normal_(std=0.05)
    model.save_pretrained(root / "scratch" / name)
    Storage.from_uri(str(root)).upload_dir(root / "scratch" / name, adapter_prefix(name, "v1"))


def test_init_from_starts_training_from_the_parent_adapters_weights(tmp_path: Path, tiny_llama_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ray_jobs.train.plan import WorkerPlan
    from ray_jobs.train.trainer import Trainer, WorkerContext

    publish_random_adapter(tmp_path, tiny_llama_dir, "parent")
    recipe = tiny_recipe("child", tmp_path / "notes.json", str(tmp_path), lora={"init_from": "parent"})
    assert train_run.parent_adapter(recipe, Storage.from_uri(str(tmp_path))) == ("parent", "v1")
    plan = WorkerPlan(
        recipe=recipe,
        model_dir=str(tiny_llama_dir),
        total_steps=2,
        pad_id=0,
        has_eval=False,
        init_adapter=("parent", "v1"),
    )
    trainer = Trainer(plan, WorkerContext(rank=0, world=1, device=torch.device("cpu")))
    trainer.setup()
    ids = torch.tensor([[5, 17, 42, 9, 33, 8]])
    parent = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), tmp_path / "scratch" / "parent"
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        got, expected = trainer.model.eval()(input_ids=ids).logits, parent.eval()(input_ids=ids).logits
        plain = base.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # step 0 is the parent
    assert not torch.allclose(got, plain, atol=1e-4)


@pytest.mark.parametrize(
    ("lora", "problem"),
    [({"r": 8}, r"rank 4 \(lora.r is 8\)"), ({"targets": "mlp"}, r"target modules .*k_proj.* \(lora.targets gives")],
)
def test_init_from_a_parent_of_another_shape_is_refused_naming_the_keys(tmp_path, tiny_llama_dir, lora, problem):
    publish_random_adapter(tmp_path, tiny_llama_dir, "parent")
    recipe = tiny_recipe("child", tmp_path / "notes.json", str(tmp_path), lora={"init_from": "parent@v1", **lora})
    with pytest.raises(train_run.TrainError, match=rf"lora.init_from: parent@v1 has {problem}"):
        train_run.parent_adapter(recipe, Storage.from_uri(str(tmp_path)))


def test_the_crash_hook_is_installed_only_when_asked_for(tmp_path: Path, tiny_llama_dir: Path, monkeypatch):
    from ray_jobs.train.trainer import FAULT_ENV, CrashOnceAtStep, fault_hooks

    marker = str(tmp_path / "fault-injected")
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_hooks(trainer_plan(tmp_path, tiny_llama_dir, fault_marker=marker)) == []
    (hook,) = fault_hooks(trainer_plan(tmp_path, tiny_llama_dir, fault_at_step=5, fault_marker=marker))
    assert isinstance(hook, CrashOnceAtStep) and hook.step == 5
    monkeypatch.setenv(FAULT_ENV, "3")
    (hook,) = fault_hooks(trainer_plan(tmp_path, tiny_llama_dir, fault_marker=marker))
    assert hook.step == 3


def test_zero3_with_8bit_weights_is_refused_naming_the_key():
    from ray_jobs.core.recipe import RecipeError

    with pytest.raises(RecipeError, match="train.deepspeed") as error:
        tiny_recipe(
            "x",
            Path("notes.json"),
            "/tmp/x",
            model={"quantization": "8bit"},
            train={"deepspeed": "zero3", "gpus_per_worker": 1},
        )
    assert len(error.value.problems) == 1


def test_a_missing_deepspeed_profile_is_refused_before_ray_starts(tmp_path: Path):
    recipe = tiny_recipe("x", tmp_path / "notes.json", str(tmp_path), train={"deepspeed": str(tmp_path / "nope.json")})
    with pytest.raises(train_run.TrainError, match="train.deepspeed: profile file not found"):
        train_run.deepspeed_config(recipe)
    (tmp_path / "bad.json").write_text("{not json")
    recipe = tiny_recipe("x", tmp_path / "notes.json", str(tmp_path), train={"deepspeed": str(tmp_path / "bad.json")})
    with pytest.raises(train_run.TrainError, match="not valid JSON"):
        train_run.deepspeed_config(recipe)


# --------------------------------------------------------------------------- preflight on a real cluster
REPO = Path(__file__).resolve().parents[1]
LOCAL = "local"
"""Recipe name of every run on the shared local storage: one name, one preprocessed dataset."""


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory: pytest.TempPathFactory, ray_cluster) -> tuple[Path, str]:
    """(notes file, storage root) shared by the local runs of this module."""
    root = tmp_path_factory.mktemp("local-runs")
    return notes_file(root), str(root / "store")


@pytest.mark.usefixtures("ray_cluster")
def test_more_gpus_than_the_cluster_has_fails_before_any_worker_starts(tmp_path: Path):
    recipe = tiny_recipe("x", notes_file(tmp_path), str(tmp_path), train={"workers": 2, "gpus_per_worker": 4})
    with pytest.raises(train_run.TrainError, match=r"asks for 8 GPUs but the Ray cluster has 0"):
        pipeline.train(recipe)


@pytest.mark.usefixtures("ray_cluster")
def test_workers_that_would_take_every_cpu_are_refused(tmp_path: Path):
    recipe = tiny_recipe("x", notes_file(tmp_path), str(tmp_path), train={"workers": 2, "cpus_per_worker": 1})
    with pytest.raises(train_run.TrainError, match="Ray Data needs at least one free CPU"):
        pipeline.train(recipe)


@pytest.mark.usefixtures("ray_cluster")
def test_missing_training_data_is_a_one_line_error(tmp_path: Path):
    from ray_jobs.preprocess.pipeline import PreprocessError

    recipe = tiny_recipe("x", tmp_path / "absent.json", str(tmp_path))
    with pytest.raises((PreprocessError, FileNotFoundError), match="absent.json"):
        pipeline.train(recipe)


def test_too_few_rows_for_one_step_names_the_keys(local_runs):
    # 64 notes pack into ~24 rows of 256 tokens: far fewer than one step of 64 x 4.
    data, root = local_runs
    recipe = tiny_recipe(LOCAL, data, root, train={"micro_batch_size": 64, "grad_accum": 4})
    with pytest.raises(train_run.TrainError, match="too few for one optimizer step"):
        pipeline.train(recipe)


# --------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def s3_lora_run(tmp_path_factory: pytest.TempPathFactory, s3_server: str, ray_cluster):
    """LoRA on two Ray Train workers, checkpoints and adapter in the S3 test server."""
    import boto3

    bucket = "medtune-train-two-workers"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("two-workers")
    # MLflow, as a user configures it: a local file store stands in for a tracking server (MLflow
    # 3 wants the opt-in variable for it, which the driver's MLFLOW_* environment carries to rank 0).
    tracking = {"mlflow_uri": f"file://{tmp / 'mlruns'}"}
    previous = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    recipe = tiny_recipe(
        "two-workers", notes_file(tmp), f"s3://{bucket}/medtune", train={"workers": 2, "tracking": tracking}
    )
    result = pipeline.train(recipe, run_name="two-workers-r1")
    yield recipe, result, Storage.from_uri(recipe.storage.root), tmp
    if previous is None:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
    else:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = previous


@pytest.mark.slow
def test_two_workers_publish_a_complete_versioned_adapter_to_s3(s3_lora_run):
    recipe, result, storage, tmp = s3_lora_run
    assert result.adapter_uri.startswith("s3://medtune-train-two-workers/medtune/adapters/two-workers/")
    assert storage.complete_versions(adapter_prefix("two-workers")) == [result.adapter_version]
    local = Path(storage.download_dir(adapter_prefix("two-workers", result.adapter_version), tmp / "adapter"))
    config = json.loads((local / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny:llama"  # what vLLM / Ray Serve LLM look up
    lineage = json.loads((local / "lineage.json").read_text())
    assert lineage["dataset_fingerprint"] and lineage["recipe_hash"] == recipe.recipe_hash()
    assert lineage["final_metrics"]["step"] == 4
    assert (local / "tokenizer.json").exists()
    tensors = adapter_tensors(local)
    assert tensors and all(t.numel() > 0 for t in tensors.values())


@pytest.mark.slow
def test_a_configured_mlflow_receives_every_logged_step_from_rank_0_only(s3_lora_run):
    from mlflow.tracking import MlflowClient

    recipe, result, storage, tmp = s3_lora_run
    client = MlflowClient(recipe.train.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name("two-workers")
    (run,) = client.search_runs([experiment.experiment_id])  # one run: rank 1 logs nothing
    assert run.info.run_name == "two-workers-r1" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [metric.step for metric in history] == [1, 2, 3, 4]  # log_every: 1, max_steps: 4
    assert {"lr", "tokens_per_s", "grad_norm"} <= set(run.data.metrics)


@pytest.mark.slow
def test_every_logged_step_is_also_kept_as_json_lines_with_the_run(s3_lora_run):
    """metrics.jsonl needs neither TensorBoard nor a tracker; tokens/s counts both workers'
    real tokens over each log window, so it can be compared across worker counts."""
    recipe, result, storage, tmp = s3_lora_run
    lines = storage.read_text(f"{run_prefix(result.run)}/tensorboard/metrics.jsonl").splitlines()
    logged = [json.loads(line) for line in lines]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert all(m["tokens_per_s"] > 0 and m["loss"] > 0 for m in logged)
    assert logged[-1]["final"] is True


@pytest.mark.slow
def test_the_published_adapter_reproduces_the_trained_weights_in_plain_peft(s3_lora_run, tiny_llama_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from ray_jobs.core.modeling import resolve_model_dir
    from ray_jobs.train.checkpointing import load_trainable

    recipe, result, storage, tmp = s3_lora_run
    base_dir = resolve_model_dir(recipe.model, storage)
    published = Path(storage.download_dir(adapter_prefix("two-workers", result.adapter_version), tmp / "published"))
    step = json.loads((published / "lineage.json").read_text())["metrics"]["step"]
    checkpoint = checkpoint_dirs(storage, result.run, tmp / "checkpoints")[step]

    # The trained model, rebuilt from the raw trainable tensors of the checkpoint's state...
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    trained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    assert load_trainable(trained, state["trainable"]) == []
    # ... and the published adapter loaded the way any PEFT user would.
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), published)
    ids = torch.randint(5, 600, (2, 40))
    with torch.no_grad():
        expected, got = trained.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4), "the adapter changed nothing: training did not reach it"


@pytest.mark.slow
def test_checkpoints_hold_adapter_optimizer_scheduler_rng_and_data_position(s3_lora_run):
    recipe, result, storage, tmp = s3_lora_run
    checkpoints = checkpoint_dirs(storage, result.run, tmp / "state")
    assert set(checkpoints) == {2, 4}  # every checkpoint_every=2 steps and the end, keep 2
    state = torch.load(checkpoints[4] / STATE_FILE, map_location="cpu", weights_only=False)
    assert {"trainable", "optimizer", "scheduler", "rng", "position"} <= set(state)
    assert state["position"]["step"] == 4 and state["optimizer"]["state"]
    assert (checkpoints[4] / ADAPTER_DIR / "adapter_model.safetensors").exists()
    tensorboard = storage.list_files(f"{run_prefix(result.run)}/tensorboard")
    assert any("tfevents" in f for f in tensorboard)


def resumable_recipe(data: Path, root: str):
    return tiny_recipe(
        LOCAL, data, root, train={"max_steps": 6, "checkpoint_every": 2, "max_failures": 1, "workers": 2}
    )


@pytest.fixture(scope="module")
def unbroken(local_runs):
    """The reference: the resumable recipe trained without any failure."""
    data, root = local_runs
    return pipeline.train(resumable_recipe(data, root), run_name=f"{LOCAL}-unbroken")


def assert_same_weights(expected_dir: Path, got_dir: Path) -> None:
    expected, got = adapter_tensors(expected_dir), adapter_tensors(got_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_killed_worker_resumes_from_its_checkpoint_and_ends_where_an_unbroken_run_ends(local_runs, unbroken):
    data, root = local_runs
    recipe = resumable_recipe(data, root)
    # The worker process exits hard (os._exit) right after optimizer step 5, as an OOM kill would.
    broken = pipeline.train(recipe, run_name=f"{LOCAL}-broken", fault_at_step=5)
    assert broken.run != unbroken.run and broken.adapter_uri != unbroken.adapter_uri
    lineage = json.loads(Path(broken.adapter_uri, "lineage.json").read_text())
    # Ray Train registers a reported checkpoint asynchronously, so the restart may find the
    # step-4 checkpoint or (if the crash won the race) step 2; never a fresh start.
    assert lineage["final_metrics"].get("resumed_from_step") in (2, 4)
    assert (
        "resumed_from_step" not in json.loads(Path(unbroken.adapter_uri, "lineage.json").read_text())["final_metrics"]
    )
    # Each step logged once, though the failed attempt logged steps past the checkpoint too.
    metrics = Storage.from_uri(root).read_text(f"{run_prefix(broken.run)}/tensorboard/metrics.jsonl").splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4, 5, 6]
    # Same data order and RNG after the restart: the same weights as the run that never broke.
    assert_same_weights(Path(unbroken.adapter_uri), Path(broken.adapter_uri))


def train_command(recipe_file: Path, run: str) -> list[str]:
    return [sys.executable, "-m", "ray_jobs.train", str(recipe_file), "--run", run]


def own_cluster_env() -> dict[str, str]:
    # A fresh local Ray cluster per command, never the test session's: killing it must not
    # touch the session's cluster.
    return {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def kill_with_its_cluster(process: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (raylet, GCS, workers): a lost head pod."""
    import psutil

    family = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)


@pytest.mark.slow
def test_after_the_whole_cluster_is_lost_the_same_command_resumes_and_ends_like_an_unbroken_run(
    local_runs, unbroken, tmp_path: Path
):
    data, root = local_runs
    recipe = resumable_recipe(data, root)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe_to_yaml(recipe))
    run = f"{LOCAL}-lost-cluster"
    runs = Path(root) / run_prefix(run)
    first = subprocess.Popen(train_command(recipe_file, run), env=own_cluster_env(), cwd=REPO)
    deadline = time.time() + 600
    # Kill as soon as Ray Train has recorded a checkpoint (its snapshot names it).
    while not (runs / "checkpoint_manager_snapshot.json").exists():
        assert first.poll() is None, "the first attempt ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    kill_with_its_cluster(first)

    second = subprocess.run(
        train_command(recipe_file, run), env=own_cluster_env(), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming {LOCAL}" in second.stdout
    published = Path(root) / "adapters" / LOCAL
    lineages = [json.loads(p.read_text()) for p in published.glob("*/lineage.json")]
    resumed = [lin for lin in lineages if lin["run"].endswith(run)]
    assert len(resumed) == 1 and resumed[0]["final_metrics"]["resumed_from_step"] >= 2
    assert_same_weights(Path(unbroken.adapter_uri), published / resumed[0]["version"])

    # Submitting the finished run again trains nothing: it names the adapter it already made.
    third = subprocess.run(
        train_command(recipe_file, run), env=own_cluster_env(), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert third.returncode == 0 and "already finished" in third.stdout
    assert len(list(published.glob("*/lineage.json"))) == len(lineages)


def test_a_run_name_taken_by_another_recipe_is_refused(local_runs, unbroken):
    data, root = local_runs
    other = tiny_recipe(LOCAL, data, root, train={"max_steps": 7, "checkpoint_every": 2, "workers": 2})
    with pytest.raises(RunConflictError, match=r"local-unbroken.*another recipe.*--run NAME"):
        pipeline.train(other, run_name=f"{LOCAL}-unbroken")


def test_a_plain_resubmission_gets_the_same_default_run_name(local_runs):
    data, root = local_runs
    recipe = resumable_recipe(data, root)
    dataset = pipeline.preprocess(recipe)
    name = default_run_name(recipe, dataset)
    assert name == default_run_name(resumable_recipe(data, root), dataset)
    assert name.startswith(f"{LOCAL}-{recipe.training_hash()[:8]}-")
    changed_eval = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"max_samples": 3})})
    assert default_run_name(changed_eval, dataset) == name  # evaluation settings do not restart training


@pytest.mark.slow
def test_qlora_4bit_trains_on_two_workers_and_saves_a_plain_lora_adapter(local_runs):
    data, root = local_runs
    recipe = tiny_recipe(
        LOCAL,
        data,
        root,
        model={"quantization": "4bit", "quant": {"compute_dtype": "fp32"}},
        train={"workers": 2, "max_steps": 2},
    )
    result = pipeline.train(recipe, run_name=f"{LOCAL}-qlora")
    tensors = adapter_tensors(Path(result.adapter_uri))
    assert any("lora_A" in k for k in tensors) and all(t.numel() > 0 for t in tensors.values())
    lineage = json.loads(Path(result.adapter_uri, "lineage.json").read_text())
    assert lineage["quantization"] == "4bit" and lineage["final_metrics"]["loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_saves_the_gathered_adapter_equal_to_its_own_checkpoint(local_runs, tmp_path: Path, stage: str):
    """Under ZeRO-3 each rank holds a slice of every LoRA matrix: the adapter must be
    gathered before saving, or it comes out as [0]-shaped tensors."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    data, root = local_runs
    recipe = tiny_recipe(LOCAL, data, root, train={"workers": 2, "deepspeed": stage, "max_steps": 2})
    result = pipeline.train(recipe, run_name=f"{LOCAL}-ds-{stage}")
    published = adapter_tensors(Path(result.adapter_uri))
    lora_a = [t for k, t in published.items() if "lora_A" in k]
    assert lora_a and all(t.shape == (4, 128) for t in lora_a)  # r x hidden, not [0]

    storage = Storage.from_uri(recipe.storage.root)
    final = checkpoint_dirs(storage, result.run, tmp_path / "ckpt")[2]
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(final / "deepspeed"), tag="state")
    for key, tensor in published.items():
        match = [
            v for k, v in consolidated.items() if k.replace(".default", "").endswith(key.split("base_model.model.")[-1])
        ]
        assert match, f"{key} missing from the DeepSpeed checkpoint"
        torch.testing.assert_close(tensor.float(), match[0].float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("train", "model", "key", "module", "install"),
    [
        (
            {"tracking": {"mlflow_uri": "http://mlflow.internal:5000"}},
            {},
            "train.tracking.mlflow_uri",
            "mlflow",
            "mlflow",
        ),
        ({"tracking": {"wandb_project": "medtune"}}, {}, "train.tracking.wandb_project", "wandb", "wandb"),
        ({"liger_kernels": True}, {}, "train.liger_kernels", "liger_kernel", "medtune[gpu]"),
        ({}, {"quantization": "4bit"}, "model.quantization", "bitsandbytes", "bitsandbytes"),
        ({"deepspeed": "zero2"}, {}, "train.deepspeed", "deepspeed", "deepspeed"),
    ],
)
def test_a_package_the_recipe_needs_is_checked_before_training_with_its_install_line(
    tmp_path, monkeypatch, train, model, key, module, install
):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # Python's own "not installed": imports and find_spec fail
    recipe = tiny_recipe("x", tmp_path / "notes.json", str(tmp_path), train=train, model=model)
    with pytest.raises(
        MissingPackageError, match=rf"{re.escape(key)} needs {module}: pip install '{re.escape(install)}'"
    ):
        check_packages(recipe, "train")
    check_packages(tiny_recipe("x", tmp_path / "notes.json", str(tmp_path)), "train")  # not asked for: no error


def test_step_lines_show_progress_and_an_eta_from_the_pace_so_far(tmp_path: Path, capsys, monkeypatch):
    from ray_jobs.train import tracking

    recipe = tiny_recipe("x", tmp_path / "notes.json", str(tmp_path))
    log = tracking.MetricsLog(recipe, run_name=None, folder=None, rank=0, total_steps=100, resumed_from=None)
    clock = iter([1000.0, 1030.0, 1060.0])  # 10 steps per 30 s
    monkeypatch.setattr(tracking.time, "monotonic", lambda: next(clock))
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 500.0}, step)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[medtune] step 10/100 ") and "ETA" not in lines[0]
    assert lines[1].endswith("tok/s ETA 4m00s")  # 80 steps at 3 s each
    assert lines[2].endswith("tok/s ETA 3m30s")

"""What medtune hands vLLM, checked without vLLM (CI has no GPU and no vLLM; the engine itself is
tested on a GPU by test_serve_vllm_gpu.py): which engine a replica picks and why, the engine
arguments a recipe becomes, LoRA requests built from the node-local adapter cache, the adapter
folders vLLM would refuse, and each request field translated to vLLM's sampling parameters."""

from __future__ import annotations

import json

import pytest

from helpers import make_adapter
from ray_jobs.core.engines import (
    EngineUnavailableError,
    adapter_rank,
    choose_engine,
    engine_args,
    lora_limits,
    lora_request_fields,
    sampling_fields,
    vllm_problems,
    vllm_rank,
)
from ray_jobs.core.recipe import parse_recipe
from ray_jobs.core.storage import Storage, adapter_prefix
from ray_jobs.serve.engines import serving_model
from ray_jobs.serve.engines.base import GenerationRequest
from ray_jobs.serve.engines.hf_streams import CONTINUOUS_SUPPORTS
from ray_jobs.serve.engines.vllm_async import VLLMEngine
from ray_jobs.serve.protocol import APIError, ChatRequest, check_features
from ray_jobs.serve.registry import AdapterRegistry


def recipe(model: dict | None = None, serve: dict | None = None, lora: dict | None = None):
    return parse_recipe(
        {
            "name": "contract",
            "model": {"base": "org/base-8b", "dtype": "bf16", **(model or {})},
            "data": {"format": "chat", "train": "unused.jsonl"},
            "lora": lora or {},
            "train": {"gpus_per_worker": 1},
            "serve": serve or {},
        }
    )


# ---------------------------------------------------------------------- engine choice
def test_auto_serves_with_vllm_when_it_is_installed_and_a_gpu_is_visible():
    assert choose_engine("auto", recipe(), has_vllm=True, has_gpu=True)[0] == "vllm"


@pytest.mark.parametrize(
    "has_vllm, has_gpu, model, lora, reason",
    [
        (False, True, {}, {}, "vLLM is not installed"),
        (True, False, {}, {}, "no GPU"),
        (True, True, {"dtype": "fp32"}, {}, "fp32"),
        (True, True, {}, {"use_dora": True}, "lora.use_dora"),
        (True, True, {}, {"bias": "lora_only"}, "lora.bias"),
    ],
)
def test_auto_falls_back_to_hf_saying_why_and_vllm_refuses_to_start(has_vllm, has_gpu, model, lora, reason):
    chosen, why = choose_engine("auto", recipe(model, lora=lora), has_vllm=has_vllm, has_gpu=has_gpu)
    assert chosen == "hf" and reason in why
    with pytest.raises(EngineUnavailableError, match=reason):
        choose_engine("vllm", recipe(model, lora=lora), has_vllm=has_vllm, has_gpu=has_gpu)


def test_hf_is_served_when_asked_for_even_where_vllm_could_run():
    assert choose_engine("hf", recipe(), has_vllm=True, has_gpu=True) == ("hf", "asked for")


def test_a_quantised_recipe_is_served_on_its_unquantised_base_unless_told_otherwise():
    assert serving_model(recipe({"quantization": "4bit"})).quantization == "none"
    kept = recipe({"quantization": "4bit"}, {"keep_quantization": True})
    assert serving_model(kept).quantization == "4bit"
    assert engine_args(kept, "/m", [])["quantization"] == "bitsandbytes"
    assert "quantization" not in engine_args(recipe({"quantization": "4bit"}), "/m", [])
    with pytest.raises(ValueError, match="4-bit only"):
        engine_args(recipe({"quantization": "8bit"}, {"keep_quantization": True}), "/m", [])


# ---------------------------------------------------------------------- engine arguments
@pytest.mark.parametrize("rank, allowed", [(1, 1), (2, 8), (8, 8), (16, 16), (17, 32), (200, 256), (512, 512)])
def test_ranks_round_up_to_a_max_lora_rank_vllm_accepts(rank, allowed):
    assert vllm_rank(rank) == allowed


def test_a_rank_above_vllms_largest_is_refused():
    with pytest.raises(ValueError, match="512"):
        vllm_rank(1024)


def test_lora_limits_default_from_the_adapters_listed_and_the_recipe_wins_when_set():
    listed = recipe(serve={"adapters": ["ner", "qa", "sdtm"], "max_loaded_adapters": 12}, lora={"r": 16})
    assert lora_limits(listed, adapter_ranks=[8, 24]) == {"max_loras": 3, "max_lora_rank": 32, "max_cpu_loras": 12}
    assert lora_limits(recipe(lora={"r": 8}), [])["max_loras"] == 4  # none listed
    explicit = recipe(serve={"adapters": ["ner"], "vllm": {"max_loras": 8, "max_lora_rank": 64, "max_cpu_loras": 32}})
    assert lora_limits(explicit, [128]) == {"max_loras": 8, "max_lora_rank": 64, "max_cpu_loras": 32}


def test_engine_args_carry_the_recipes_model_dtype_and_vllm_settings():
    args = engine_args(
        recipe(
            {"dtype": "fp16"},
            {
                "served_model_name": "base-8b",
                "vllm": {
                    "gpu_memory_utilization": 0.5,
                    "max_model_len": 8192,
                    "max_num_seqs": 128,
                    "enforce_eager": True,
                },
            },
        ),
        "/cache/models/base",
        [16],
    )
    assert args["model"] == args["tokenizer"] == "/cache/models/base"
    assert (args["dtype"], args["served_model_name"], args["enable_lora"]) == ("float16", "base-8b", True)
    assert (args["gpu_memory_utilization"], args["max_model_len"], args["max_num_seqs"]) == (0.5, 8192, 128)
    assert args["enforce_eager"] is True and args["max_lora_rank"] == 16
    assert "max_model_len" not in engine_args(recipe(), "/m", [])  # the model's own


def test_a_bad_vllm_setting_is_refused_on_load_naming_the_key():
    with pytest.raises(ValueError, match="max_lora_rank"):
        recipe(serve={"vllm": {"max_lora_rank": 24}})
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        recipe(serve={"vllm": {"gpu_memory_utilization": 1.5}})


# ---------------------------------------------------------------------- adapter folders
@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_llama_dir):
    """A registry over local storage holding one adapter saved by PEFT."""
    work = tmp_path_factory.mktemp("contract")
    storage = Storage.from_uri(str(work / "storage"))
    storage.upload_dir(make_adapter(tiny_llama_dir, work / "ner", seed=1, rank=8), adapter_prefix("ner", "v3"))
    return AdapterRegistry(storage, "tiny", refresh_s=60), work


def test_lora_requests_point_at_the_node_local_copy_vllm_reads(published, s3_server, tmp_path, monkeypatch):
    import boto3

    _, work = published
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="contract")
    storage = Storage.from_uri("s3://contract/medtune")
    storage.upload_dir(work / "ner", adapter_prefix("ner", "v3"))
    registry = AdapterRegistry(storage, "tiny", refresh_s=60)
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    local = registry.fetch(*registry.resolve("ner"))
    fields = lora_request_fields("ner@v3", 7, local)
    assert fields == {"lora_name": "ner@v3", "lora_int_id": 7, "lora_path": local}
    assert local.startswith(str(tmp_path / "cache")) and local.endswith("ner/v3")  # vLLM reads local folders
    with open(f"{local}/adapter_config.json") as handle:  # what vLLM's PEFTHelper reads
        assert json.load(handle)["r"] == 8
    assert adapter_rank(local) == 8 and vllm_problems(local) == []


def edited(source, target, **config_changes):
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return target


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "adapter bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"r": 128}, "exceeds max_lora_rank 64"),
        ({"peft_type": "IA3"}, "LoRA only"),
    ],
)
def test_adapter_folders_vllm_would_refuse_are_named_with_the_reason(published, tmp_path, change, problem):
    registry, work = published
    source = work / "storage" / "adapters" / "ner" / "v3"
    problems = vllm_problems(edited(source, tmp_path / "edited", **change), max_lora_rank=64)
    assert any(problem in p for p in problems), problems


def test_missing_or_foreign_weights_are_named(published, tmp_path):
    registry, work = published
    source = work / "storage" / "adapters" / "ner" / "v3"
    missing = edited(source, tmp_path / "missing")
    (missing / "adapter_model.safetensors").unlink()
    assert vllm_problems(missing) == ["no adapter_model.safetensors"]
    garbage = edited(source, tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert "unreadable" in vllm_problems(garbage)[0]
    assert vllm_problems(tmp_path / "nothing-here")[0].endswith("no adapter_config.json")


def test_weights_other_than_lora_matrices_are_refused(published, tmp_path):
    import torch
    from safetensors.torch import save_file

    registry, work = published
    extra = edited(work / "storage" / "adapters" / "ner" / "v3", tmp_path / "extra")
    save_file(
        {
            "base_model.model.lm_head.weight": torch.zeros(2, 2),
            "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 2),
        },
        str(extra / "adapter_model.safetensors"),
    )
    assert any("lm_head" in p for p in vllm_problems(extra))


# ---------------------------------------------------------------------- requests
def test_greedy_requests_ignore_top_p_and_pass_the_rest_through():
    fields = sampling_fields(
        GenerationRequest(
            prompt_ids=[1, 2],
            adapter="ner@v1",
            max_tokens=32,
            temperature=0.0,
            top_p=0.5,
            seed=3,
            stop=["\n\n"],
            logprobs=2,
            ignore_eos=True,
            presence_penalty=0.5,
        )
    )
    assert fields == {
        "max_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 3,
        "stop": ["\n\n"],
        "ignore_eos": True,
        "logprobs": 2,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.0,
        "skip_special_tokens": True,
    }
    assert sampling_fields(GenerationRequest([1], None, temperature=0.7, top_p=0.9))["top_p"] == 0.9


SCHEMA = {"type": "object", "properties": {"drug": {"type": "string"}}, "required": ["drug"]}


@pytest.mark.parametrize(
    "response_format, structured",
    [
        ({"type": "json_object"}, {"json_object": True}),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}, {"json": SCHEMA}),
    ],
)
def test_response_formats_become_vllm_structured_outputs(response_format, structured):
    request = ChatRequest.model_validate(
        {"model": "ner", "messages": [{"role": "user", "content": "hi"}], "response_format": response_format}
    )
    generation = GenerationRequest([1], "ner@v1", response_format=request.response_format.model_dump(by_alias=True))
    assert sampling_fields(generation)["structured_outputs"] == structured
    compact = sampling_fields(generation, json_whitespace=False)["structured_outputs"]
    assert compact == {**structured, "disable_any_whitespace": True}
    assert "structured_outputs" not in sampling_fields(GenerationRequest([1], None, response_format={"type": "text"}))


# ---------------------------------------------------------------------- fields an engine does not honour
def chat(**fields):
    return ChatRequest.model_validate({"model": "ner", "messages": [{"role": "user", "content": "hi"}], **fields})


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.3}, "presence_penalty"),
        ({"ignore_eos": True}, "ignore_eos"),
    ],
)
def test_every_feature_vllm_honours_is_accepted_by_vllm_and_a_400_on_engines_without_it(fields, param):
    check_features(chat(**fields), "vllm", VLLMEngine.supports)  # no error
    with pytest.raises(APIError) as refused:
        check_features(chat(**fields), "hf-static", frozenset())
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "unsupported_field", param)


def test_the_hf_continuous_engine_refuses_only_constrained_decoding_and_penalties():
    continuous = CONTINUOUS_SUPPORTS
    check_features(chat(logprobs=True, top_logprobs=2, ignore_eos=True), "hf", continuous)
    with pytest.raises(APIError, match="response_format"):
        check_features(chat(response_format={"type": "json_object"}), "hf", continuous)

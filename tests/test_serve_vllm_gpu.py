"""vLLM behind medtune's endpoint, on a GPU (device machine only; CI has neither).

One Serve app with `serve.engine: vllm` serves a tiny Llama in fp16 (vLLM's LoRA kernels take
fp16 or bf16; fp16 keeps three more mantissa bits) and two random LoRA adapters from local
storage, over real HTTP with the `openai` client. The adapters' weights (std 0.1) change every
answer yet leave greedy decoding stable under half precision: with std 0.3 the tiny model is
chaotic, and PEFT itself in fp16 agrees with PEFT in fp32 on only 6 of 20 prompts.
- greedy answers through each adapter equal plain PEFT `generate` (fp32, one request at a time)
  for at least 90% of the prompts, compared over their first 16 tokens (as text without
  whitespace: vLLM detokenizes incrementally, which may space tokens differently);
- `response_format` json_schema and json_object answers parse, the first against its schema
  (compact JSON, serve.vllm.json_whitespace false: random weights otherwise repeat newlines
  inside the object until max_tokens);
- log-probabilities, `n` and seeds come back as the OpenAI API describes them.

    PYTHONPATH=/tmp/vllm-site:/tmp/gpu-site:$PWD python -m pytest -m gpu tests/test_serve_vllm_gpu.py
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from helpers import Oracle, free_port, make_adapter
from ray_jobs.core.recipe import parse_recipe
from ray_jobs.core.storage import Storage, adapter_prefix

pytestmark = pytest.mark.gpu

BASE = "tiny-llama"
ADAPTER_STD = 0.1
PROMPTS = [
    f"{lead} {finding}"
    for lead in ("Patient reports", "History of", "Discharged after", "Started on")
    for finding in ("fatigue and anemia", "chest pain", "type 2 diabetes", "metformin 500 mg", "a fever")
]
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["entities", "severity"],
    "properties": {
        "entities": {
            "type": "array",
            "maxItems": 3,
            "items": {"type": "string", "enum": ["fever", "anemia", "fatigue"]},
        },
        "severity": {"type": "string", "enum": ["mild", "moderate", "severe"]},
    },
}


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    import ray
    from ray import serve

    from ray_jobs.serve.deployment import build_app
    from ray_jobs.tiny_model import build_tiny_model

    work = tmp_path_factory.mktemp("vllm")
    base = build_tiny_model(work / "base", "llama", hidden_size=256)
    storage = Storage.from_uri(str(work / "storage"))
    adapters = {name: make_adapter(base, work / name, seed, std=ADAPTER_STD) for name, seed in (("ner", 1), ("qa", 2))}
    for name, folder in adapters.items():
        storage.upload_dir(folder, adapter_prefix(name, "v1"))
    port = free_port()
    recipe = parse_recipe(
        {
            "name": "vllm-test",
            "model": {"base": str(base), "dtype": os.environ.get("MEDTUNE_VLLM_TEST_DTYPE", "fp16")},
            "data": {"format": "chat", "train": "unused.jsonl"},
            "storage": {"root": str(work / "storage")},
            "serve": {
                "engine": "vllm",
                "served_model_name": BASE,
                "port": port,
                "gpus_per_replica": 1,
                "adapters": ["ner"],
                "vllm": {"enforce_eager": True, "gpu_memory_utilization": 0.3, "json_whitespace": False},
            },
        }
    )
    ray.init(include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.perf_counter()
    serve.run(build_app(recipe), name="vllm-test", route_prefix="/")
    print(f"vLLM app ready in {time.perf_counter() - started:.0f}s")
    yield f"http://127.0.0.1:{port}", adapters, Oracle(base)
    serve.shutdown()
    ray.shutdown()


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_replica_runs_vllm(vllm_server):
    url, _, _ = vllm_server
    with urllib.request.urlopen(f"{url}/healthz") as response:
        health = json.loads(response.read())
    assert health["engine"] == "vllm" and "ner@v1" in health["loaded_adapters"], health


@pytest.mark.parametrize("adapter", ["ner", "qa"])
def test_greedy_answers_match_peft_generate_for_nine_prompts_in_ten(vllm_server, adapter):
    url, adapters, oracle = vllm_server
    matches, report = 0, []
    assert sum(oracle.answer(adapters[adapter], p, 16) != oracle.answer(None, p, 16) for p in PROMPTS) >= 18, (
        "the adapter must change the answers, or this test cannot tell adapters apart"
    )
    for prompt in PROMPTS:
        answer = client(url).chat.completions.create(
            model=adapter, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0
        )
        got = answer.choices[0].message.content
        expected = oracle.answer(adapters[adapter], prompt, 16)
        same = "".join(got.split()) == "".join(expected.split())
        matches += same
        report.append((prompt, got, expected))
    print(f"{adapter}: {matches}/{len(PROMPTS)} greedy answers equal PEFT generate's first 16 tokens")
    for prompt, got, expected in report[:3]:
        print(f"  {prompt!r}\n    vLLM: {got!r}\n    PEFT: {expected!r}")
    base = (
        client(url)
        .chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=16, temperature=0
        )
        .choices[0]
        .message.content
    )
    print(f"  base: vLLM {base!r}\n        PEFT {oracle.answer(None, PROMPTS[0], 16)!r}")
    assert matches >= 0.9 * len(PROMPTS), report


def test_a_json_schema_answer_parses_against_its_schema(vllm_server):
    url, _, _ = vllm_server
    for prompt in PROMPTS[:5]:
        answer = client(url).chat.completions.create(
            model="ner",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=128,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "entities", "schema": SCHEMA}},
        )
        text = answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop", text
        parsed = json.loads(text)
        assert set(parsed) == {"entities", "severity"}, parsed
        assert set(parsed["entities"]) <= {"fever", "anemia", "fatigue"} and len(parsed["entities"]) <= 3
        assert parsed["severity"] in ("mild", "moderate", "severe")
    anything = client(url).chat.completions.create(
        model="qa",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=128,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = anything.choices[0].message.content
    print(f"json_object: {text[:80]!r}... ({anything.choices[0].finish_reason})")
    # Random weights may fill a JSON string until max_tokens; a finished answer must parse.
    assert text.startswith("{")
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_logprobs_n_and_seed_follow_the_openai_api(vllm_server):
    url, _, _ = vllm_server
    answer = client(url).chat.completions.create(
        model="ner",
        messages=[{"role": "user", "content": PROMPTS[2]}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(len(token.top_logprobs) == 3 and token.logprob <= 0 for token in content)
    sampled = client(url).completions.create(
        model="qa", prompt=PROMPTS[3], max_tokens=12, temperature=1.0, n=3, seed=11
    )
    again = client(url).completions.create(model="qa", prompt=PROMPTS[3], max_tokens=12, temperature=1.0, n=3, seed=11)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert len({c.text for c in sampled.choices}) > 1, "n choices sample with different seeds"

"""The Serve app over real HTTP: OpenAI clients, adapters from local and S3 storage, bad input.

One app (`server`) serves a tiny Llama and LoRA adapters with large random weights from local
storage; a second (`strict_server`, route /strict) serves adapters from the S3 test server
behind API keys, with a tiny queue and a short timeout. Both start once per module on a free
loopback port. Every answer an adapter gives is compared with what plain PEFT `generate`
answers for that adapter alone (greedy), which proves the right adapter answered it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import Oracle, free_port, make_adapter
from ray_jobs.core.recipe import parse_recipe
from ray_jobs.core.storage import Storage, adapter_prefix

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE_NAME = "tiny-llama"
API_KEY = "test-key-123"
PROMPTS = ["The patient has diabetes", "Prescribed metformin twice daily", "Chest pain and fever", "SDTM domain AE"]
PHI_MARKER = "Jane Q. Doe SSN 078-05-1120 MRN 99817263"


# ---------------------------------------------------------------------- adapters
def publish(storage: Storage, local_dir: Path, name: str, version: str) -> None:
    storage.upload_dir(local_dir, adapter_prefix(name, version))


# ---------------------------------------------------------------------- HTTP helpers
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self):
        return json.loads(self.text)


def http(
    method: str,
    url: str,
    body: bytes | str | dict | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120,
) -> Reply:
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode())
    except urllib.error.HTTPError as error:
        return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read().decode())


def chat_body(model: str, text: str, max_tokens: int = 12, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def assert_openai_error(reply: Reply, status: int | tuple[int, ...], code: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert reply.status in statuses, (reply.status, reply.text)
    error = reply.json()["error"]
    assert error["message"] and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    return error


# ---------------------------------------------------------------------- the servers
@dataclass
class Server:
    base_url: str
    storage: Storage
    adapters: dict[str, Path]
    oracle: Oracle
    health_log: list[tuple[int, str]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


def serve_recipe(root: str, base_dir: Path, port: int, **serve_options):
    return parse_recipe(
        {
            "name": "serve-test",
            "model": {"base": str(base_dir)},
            "data": {"format": "chat", "train": "unused.jsonl"},
            "storage": {"root": root},
            "serve": {
                "served_model_name": BASE_NAME,
                "host": "127.0.0.1",
                "port": port,
                "cpus_per_replica": 0.5,
                "adapter_refresh_s": 0,
                **serve_options,
            },
        }
    )


def deploy(recipe, app_name: str, health_url: str) -> list[tuple[int, str]]:
    """Deploy the app while polling its health URL; returns every (status, body) seen until ready."""
    from ray import serve

    from ray_jobs.serve.deployment import build_app

    seen: list[tuple[int, str]] = []

    def poll() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                reply = http("GET", health_url, timeout=10)
                seen.append((reply.status, reply.text))
            except OSError as error:  # the proxy may not answer while the app deploys
                seen.append((0, str(error)))
                continue
            if reply.status == 200:
                return
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    serve.run(build_app(recipe), name=app_name, route_prefix=recipe.serve.route_prefix)
    poller.join(timeout=60)
    return seen


@pytest.fixture(scope="module")
def serve_port(ray_cluster) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    seeds = {"ner": 1, "qa": 2, "evolving-v1": 3, "evolving-v2": 4, "s3ner": 5}
    return {name: make_adapter(tiny_llama_dir, root / name, seed) for name, seed in seeds.items()}


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir) -> Oracle:
    return Oracle(tiny_llama_dir)


@pytest.fixture(scope="module")
def server(serve_port, tmp_path_factory, tiny_llama_dir, adapter_dirs, oracle) -> Server:
    root = tmp_path_factory.mktemp("serve-storage")
    storage = Storage.from_uri(str(root))
    publish(storage, adapter_dirs["ner"], "ner", "v1")
    publish(storage, adapter_dirs["qa"], "qa", "v1")
    publish(storage, adapter_dirs["evolving-v1"], "evolving", "v1")
    corrupt = tmp_path_factory.mktemp("corrupt")
    (corrupt / "adapter_config.json").write_text((adapter_dirs["ner"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)
    publish(storage, corrupt, "broken", "v1")
    recipe = serve_recipe(str(root), tiny_llama_dir, serve_port, max_batch_size=16, batch_wait_timeout_s=0.02)
    base_url = f"http://127.0.0.1:{serve_port}"
    health_log = deploy(recipe, "medtune", f"{base_url}/healthz")
    yield Server(base_url, storage, {"ner": adapter_dirs["ner"], "qa": adapter_dirs["qa"]}, oracle, health_log)
    from ray import serve

    serve.delete("medtune")


@pytest.fixture(scope="module")
def strict_server(serve_port, s3_server, tmp_path_factory, tiny_llama_dir, adapter_dirs, oracle) -> Server:
    """Adapters from the S3 test server, API keys, a queue of one, a 2 s timeout and streams
    that send at most a chunk per 0.5 s."""
    import boto3

    bucket = f"medtune-serve-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    storage = Storage.from_uri(f"s3://{bucket}/medtune")
    publish(storage, adapter_dirs["s3ner"], "s3ner", "v1")
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# one key per line\n{API_KEY}\n")
    recipe = serve_recipe(
        storage.root_uri,
        tiny_llama_dir,
        serve_port,
        route_prefix="/strict",
        api_keys_file=str(keys),
        max_ongoing_requests=1,
        max_queued_requests=1,
        retry_after_s=3,
        request_timeout_s=2,
        max_batch_size=1,
        adapters=["s3ner"],
        stream_interval_s=0.5,
    )
    base_url = f"http://127.0.0.1:{serve_port}/strict"
    health_log = deploy(recipe, "strict", f"{base_url}/healthz")
    yield Server(base_url, storage, {"s3ner": adapter_dirs["s3ner"]}, oracle, health_log)
    from ray import serve

    serve.delete("strict")


def openai_client(server: Server, api_key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=server.url("/v1"), api_key=api_key, max_retries=0, timeout=120)


# ---------------------------------------------------------------------- health and discovery
def test_healthz_is_ready_only_once_the_base_model_is_loaded(server):
    statuses = [status for status, _ in server.health_log]
    assert statuses[-1] == 200
    assert statuses[0] != 200, "healthz answered 200 before the app was deployed"
    ready = json.loads(server.health_log[-1][1])
    assert ready["status"] == "ok" and ready["base_model"] == BASE_NAME
    # Ready means ready: the base model answers at once.
    reply = http("POST", server.url("/v1/completions"), {"model": BASE_NAME, "prompt": "Hello", "max_tokens": 2})
    assert reply.status == 200, reply.text


def test_models_lists_the_base_and_every_complete_adapter_version(server):
    client = openai_client(server)
    ids = [model.id for model in client.models.list().data]
    assert ids[0] == BASE_NAME
    for expected in ("ner", "ner@v1", "qa", "qa@v1", "evolving@v1"):
        assert expected in ids
    server.storage.upload_dir(server.adapters["ner"], adapter_prefix("ner", "v0-incomplete"), complete=False)
    assert "ner@v0-incomplete" not in [model.id for model in client.models.list().data]
    assert client.models.retrieve("ner@v1").id == "ner@v1"


# ---------------------------------------------------------------------- answers
def test_openai_chat_answers_come_from_the_named_adapter(server):
    client = openai_client(server)
    answers = {}
    for name in ("ner", "qa"):
        completion = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0, seed=7
        )
        answers[name] = completion.choices[0].message.content
        assert answers[name] == server.oracle.answer(server.adapters[name], PROMPTS[0], 12)
        assert completion.usage.prompt_tokens == len(server.oracle.prompt_ids(PROMPTS[0], chat=True))
        assert 0 < completion.usage.completion_tokens <= 12
        assert completion.model == name
    base = client.chat.completions.create(
        model=BASE_NAME, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0
    )
    assert base.choices[0].message.content == server.oracle.answer(None, PROMPTS[0], 12)
    assert len({answers["ner"], answers["qa"], base.choices[0].message.content}) == 3, (
        "adapters must answer differently"
    )


def test_openai_chat_stream_equals_the_non_streamed_answer(server):
    client = openai_client(server)
    stream = client.chat.completions.create(
        model="qa",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == server.oracle.answer(server.adapters["qa"], PROMPTS[1], 12)
    assert len([p for p in pieces if p]) > 1, "a stream must arrive in pieces"
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_openai_completions_streamed_and_not(server):
    client = openai_client(server)
    expected = server.oracle.answer(server.adapters["ner"], PROMPTS[2], 10, chat=False)
    completion = client.completions.create(model="ner", prompt=PROMPTS[2], max_tokens=10, temperature=0)
    assert completion.choices[0].text == expected
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="ner", prompt=PROMPTS[2], max_tokens=10, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == expected


def test_stop_strings_cut_the_answer_streamed_and_not(server):
    full = server.oracle.answer(server.adapters["ner"], PROMPTS[3], 16)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"answer too short to cut: {full!r}"
    expected = full[: full.find(stop)]
    reply = http("POST", server.url("/v1/chat/completions"), chat_body("ner", PROMPTS[3], 16, stop=[stop]))
    assert reply.json()["choices"][0]["message"]["content"] == expected
    assert reply.json()["choices"][0]["finish_reason"] == "stop"
    streamed = openai_client(server).chat.completions.create(
        model="ner",
        messages=[{"role": "user", "content": PROMPTS[3]}],
        max_tokens=16,
        temperature=0,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_content_parts_and_the_developer_role_are_read_as_current_clients_send_them(server):
    client = openai_client(server)
    parts = client.chat.completions.create(
        model="ner",
        max_tokens=12,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "The patient"}, {"type": "text", "text": "has diabetes"}],
            }
        ],
    )
    assert parts.choices[0].message.content == server.oracle.answer(
        server.adapters["ner"], "The patient\nhas diabetes", 12
    )
    as_developer, as_system = (
        http(
            "POST",
            server.url("/v1/chat/completions"),
            {
                "model": "qa",
                "max_tokens": 12,
                "temperature": 0,
                "messages": [{"role": role, "content": "Answer briefly."}, {"role": "user", "content": PROMPTS[1]}],
            },
        )
        for role in ("developer", "system")
    )
    assert as_developer.status == 200, as_developer.text
    assert as_developer.json()["choices"][0]["message"] == as_system.json()["choices"][0]["message"]


def test_logprobs_describe_the_greedy_tokens_in_openai_shape(server):
    answer = openai_client(server).chat.completions.create(
        model="ner",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = answer.choices[0].logprobs.content
    assert answer.choices[0].message.content == server.oracle.answer(server.adapters["ner"], PROMPTS[0], 8)
    assert len(content) == answer.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert token.top_logprobs[0].token == token.token, "greedy picks the most likely token"
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
    completion = openai_client(server).completions.create(
        model="qa", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == completion.usage.completion_tokens
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0


def test_n_choices_are_reproducible_with_a_seed(server):
    def sample():
        return openai_client(server).chat.completions.create(
            model="qa", messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=10, temperature=1.0, n=3, seed=11
        )

    first, again = sample(), sample()
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1, "each choice samples with its own seed"
    assert first.usage.completion_tokens > 0


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"made_up_option": True}, "made_up_option"),
    ],
)
def test_a_field_the_engine_does_not_honour_is_a_400_naming_it(server, extra, param):
    """Never accepted and then ignored: the HF engine has no constrained decoding or tools."""
    reply = http("POST", server.url("/v1/chat/completions"), chat_body("ner", PROMPTS[0], **extra))
    error = assert_openai_error(reply, 400, "unsupported_field")
    assert error["param"] == param and param in error["message"]


@pytest.mark.parametrize("model", ["qa@v1", f"{BASE_NAME}:qa", f"{BASE_NAME}:qa@v1", "base:qa"])
def test_raw_http_accepts_name_at_version_and_base_colon_adapter(server, model):
    reply = http("POST", server.url("/v1/chat/completions"), chat_body(model, PROMPTS[0]))
    assert reply.status == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["choices"][0]["message"]["content"] == server.oracle.answer(server.adapters["qa"], PROMPTS[0], 12)


def test_a_new_version_in_storage_is_served_without_a_restart(server, adapter_dirs):
    v1 = server.oracle.answer(adapter_dirs["evolving-v1"], PROMPTS[0], 12)
    v2 = server.oracle.answer(adapter_dirs["evolving-v2"], PROMPTS[0], 12)
    assert v1 != v2
    ask = lambda model: http("POST", server.url("/v1/chat/completions"), chat_body(model, PROMPTS[0])).json()
    assert ask("evolving")["choices"][0]["message"]["content"] == v1
    publish(server.storage, adapter_dirs["evolving-v2"], "evolving", "v2")
    assert ask("evolving")["choices"][0]["message"]["content"] == v2
    assert ask("evolving@v1")["choices"][0]["message"]["content"] == v1
    assert "evolving@v2" in [m["id"] for m in http("GET", server.url("/v1/models")).json()["data"]]


def test_concurrent_requests_across_adapters_each_answered_by_its_adapter(server):
    import aiohttp

    models = {
        "ner": server.adapters["ner"],
        "qa@v1": server.adapters["qa"],
        f"{BASE_NAME}:qa": server.adapters["qa"],
        BASE_NAME: None,
    }
    jobs = [(list(models)[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(200)]
    expected = {(m, p): server.oracle.answer(models[m], p, 6) for m, p in set(jobs)}

    async def run_all():
        limit = asyncio.Semaphore(16)
        async with aiohttp.ClientSession() as session:

            async def one(model, prompt):
                async with (
                    limit,
                    session.post(
                        server.url("/v1/chat/completions"), json=chat_body(model, prompt, max_tokens=6)
                    ) as response,
                ):
                    return model, prompt, response.status, await response.json()

            return await asyncio.gather(*(one(m, p) for m, p in jobs))

    results = asyncio.run(run_all())
    assert [status for *_, status, _ in results if status >= 500] == []
    wrong = [
        (m, p, body)
        for m, p, status, body in results
        if status != 200 or body["choices"][0]["message"]["content"] != expected[(m, p)]
    ]
    assert wrong == []


# ---------------------------------------------------------------------- bad input
def test_unknown_adapter_is_a_404_in_openai_shape(server):
    from openai import NotFoundError

    error = assert_openai_error(
        http("POST", server.url("/v1/chat/completions"), chat_body("nosuch", "hi")), 404, "model_not_found"
    )
    assert error["param"] == "model"
    assert_openai_error(http("POST", server.url("/v1/chat/completions"), chat_body("ner@v9", "hi")), 404)
    assert_openai_error(http("POST", server.url("/v1/chat/completions"), chat_body("other-base:ner", "hi")), 404)
    with pytest.raises(NotFoundError):
        openai_client(server).chat.completions.create(model="nosuch", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "model",
    [
        "../x",
        "a/b",
        "../../etc/passwd",
        "..%2Fx",
        "%2e%2e%2fx",
        "ner@../v1",
        "ner@v1/..",
        "/abs",
        "NER",
        "",
        ".hidden",
        "ner\x00",
    ],
)
def test_path_traversal_and_odd_names_never_reach_storage(server, model):
    reply = http("POST", server.url("/v1/chat/completions"), chat_body(model, "hi"))
    assert_openai_error(reply, (400, 404))


@pytest.mark.parametrize(
    "path", ["/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/%2e%2e%2fner", "/v1/models/a%2Fb", "/v1/models/..%252Fx"]
)
def test_url_encoded_traversal_in_the_models_route_is_rejected(server, path):
    assert_openai_error(http("GET", server.url(path)), (400, 404))


@pytest.mark.parametrize("body", ["{not json", "", "\xff\xfe", "[1, 2"])
def test_invalid_json_is_a_400(server, body):
    assert_openai_error(http("POST", server.url("/v1/chat/completions"), body), 400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [
        {"model": "ner", "messages": "hello"},
        {"model": "ner", "messages": []},
        {"model": "ner", "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": "ner", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
        {"model": "ner", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"model": "ner", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        {"model": "ner", "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
        {"model": "ner", "messages": [{"role": "user", "content": "hi"}], "n": 0},
        {"model": 7, "messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        [1, 2, 3],
    ],
)
def test_wrong_fields_are_a_4xx_in_openai_shape(server, body):
    reply = http("POST", server.url("/v1/chat/completions"), json.dumps(body))
    assert_openai_error(reply, (400, 422))


def test_completions_wrong_fields_are_a_4xx(server):
    assert_openai_error(http("POST", server.url("/v1/completions"), {"model": "ner", "prompt": ["a", 1]}), (400, 422))


def test_a_prompt_longer_than_the_context_is_a_400(server):
    long_text = "The patient has diabetes and hypertension. " * 800
    reply = http("POST", server.url("/v1/completions"), {"model": "ner", "prompt": long_text, "max_tokens": 4})
    assert_openai_error(reply, 400, "context_length_exceeded")
    reply = http("POST", server.url("/v1/completions"), {"model": "ner", "prompt": "hi", "max_tokens": 8192})
    assert_openai_error(reply, 400, "context_length_exceeded")


def test_unknown_routes_are_404_in_openai_shape(server):
    assert_openai_error(http("GET", server.url("/v1/nothing-here")), 404)


def test_a_corrupt_adapter_fails_alone_while_others_keep_serving(server):
    reply = http("POST", server.url("/v1/chat/completions"), chat_body("broken", PROMPTS[0]))
    assert_openai_error(reply, 500, "adapter_load_failed")
    good = http("POST", server.url("/v1/chat/completions"), chat_body("ner", PROMPTS[0]))
    assert good.status == 200
    assert good.json()["choices"][0]["message"]["content"] == server.oracle.answer(
        server.adapters["ner"], PROMPTS[0], 12
    )
    assert "broken@v1" not in http("GET", server.url("/healthz")).json()["loaded_adapters"]


# ---------------------------------------------------------------------- S3, auth, queue, timeout
def test_an_adapter_loads_from_the_s3_test_server(strict_server):
    client = openai_client(strict_server, API_KEY)
    completion = client.chat.completions.create(
        model="s3ner", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0
    )
    expected = strict_server.oracle.answer(strict_server.adapters["s3ner"], PROMPTS[0], 12)
    assert completion.choices[0].message.content == expected
    assert "s3ner@v1" in [m.id for m in client.models.list().data]


def test_api_keys_are_required_when_configured(strict_server):
    from openai import AuthenticationError

    url = strict_server.url("/v1/chat/completions")
    assert_openai_error(http("POST", url, chat_body(BASE_NAME, "hi")), 401, "invalid_api_key")
    assert_openai_error(http("POST", url, chat_body(BASE_NAME, "hi"), {"Authorization": "Bearer wrong"}), 401)
    assert_openai_error(http("POST", url, chat_body(BASE_NAME, "hi"), {"Authorization": API_KEY}), 401)
    assert_openai_error(http("GET", strict_server.url("/v1/models")), 401)
    with pytest.raises(AuthenticationError):
        openai_client(strict_server, "wrong").models.list()
    ok = http("POST", url, chat_body(BASE_NAME, "hi", 2), {"Authorization": f"Bearer {API_KEY}"})
    assert ok.status == 200, ok.text
    assert http("GET", strict_server.url("/healthz")).status == 200  # probes need no key


def test_a_full_replica_answers_an_openai_style_503_with_retry_after_and_frees_its_places(strict_server):
    """strict_server holds 2 requests (max_ongoing_requests 1 + max_queued_requests 1)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def burst():
        async with aiohttp.ClientSession(headers=headers) as session:

            async def one(stream: bool):
                body = {"model": BASE_NAME, "prompt": "hello", "max_tokens": 64, "stream": stream}
                async with session.post(strict_server.url("/v1/completions"), json=body) as response:
                    return response.status, dict(response.headers), await response.text()

            return await asyncio.gather(*(one(stream=i % 2 == 1) for i in range(12)))

    results = asyncio.run(burst())
    statuses = [status for status, _, _ in results]
    rejected = [(headers, text) for status, headers, text in results if status == 503]
    assert rejected and 200 in statuses and set(statuses) <= {200, 503}, statuses
    for response_headers, text in rejected:
        assert response_headers.get("Retry-After") == "3"
        assert text.startswith("{"), text
        error = json.loads(text)["error"]  # OpenAI's shape, not the proxy's plain text
        assert error["code"] == "overloaded" and "serve.max_queued_requests" in error["message"]
    # Every place was given back (streams included): more requests than the replica holds,
    # one after another, all succeed.
    for _ in range(3):
        assert (
            http(
                "POST",
                strict_server.url("/v1/chat/completions"),
                chat_body(BASE_NAME, "hi", 2),
                {"Authorization": f"Bearer {API_KEY}"},
            ).status
            == 200
        )


def test_a_place_left_behind_expires_at_its_deadline():
    """A stream whose body never started cannot release its place; its deadline does."""
    import time as clock

    from ray_jobs.serve.admission import Admission

    admission = Admission(limit=2, hold_s=0.2)
    first, second = admission.enter(), admission.enter()
    assert first and second and admission.enter() is None
    admission.leave(first)
    assert admission.enter() is not None and admission.enter() is None
    clock.sleep(0.25)
    assert admission.enter() is not None  # the places held past their deadline were dropped


def test_a_request_over_the_timeout_is_a_504_and_stops_generating(strict_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    started = time.monotonic()
    reply = http(
        "POST",
        strict_server.url("/v1/completions"),
        {"model": BASE_NAME, "prompt": "hello", "max_tokens": 4000},
        headers,
    )
    assert_openai_error(reply, 504, "timeout")
    assert time.monotonic() - started < 10
    # The timed-out row freed the model: a short request answers at once.
    started = time.monotonic()
    ok = http(
        "POST", strict_server.url("/v1/completions"), {"model": BASE_NAME, "prompt": "hi", "max_tokens": 2}, headers
    )
    assert ok.status == 200 and time.monotonic() - started < 2.5


def test_a_stream_over_the_timeout_ends_with_an_error_event(strict_server):
    from openai import APIError

    client = openai_client(strict_server, API_KEY)
    stream = client.completions.create(model=BASE_NAME, prompt="hello", max_tokens=4000, stream=True)
    with pytest.raises(APIError):
        for _ in stream:
            pass


def test_a_stream_interval_sends_the_tokens_of_the_interval_together(strict_server):
    """The first text goes out at once; then at most one chunk per 0.5 s carries what was generated."""
    client = openai_client(strict_server, API_KEY)
    whole = client.completions.create(model=BASE_NAME, prompt="hello", max_tokens=48, temperature=0)
    started = time.monotonic()
    pieces = [
        c.choices[0].text
        for c in client.completions.create(model=BASE_NAME, prompt="hello", max_tokens=48, temperature=0, stream=True)
        if c.choices and c.choices[0].text
    ]
    took = time.monotonic() - started
    assert "".join(pieces) == whole.choices[0].text
    assert len(pieces) <= 2 + took / 0.5 < whole.usage.completion_tokens, (len(pieces), took, pieces)


# ---------------------------------------------------------------------- metrics and logs
def _serve_log_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def test_request_logs_are_structured_and_free_of_prompt_text(server):
    reply = http("POST", server.url("/v1/chat/completions"), chat_body("ner", f"Patient {PHI_MARKER} has fever"))
    assert reply.status == 200
    http("POST", server.url("/v1/completions"), {"model": "ner", "prompt": PHI_MARKER, "max_tokens": "x"})
    completion = reply.json()["choices"][0]["message"]["content"]
    deadline = time.monotonic() + 20
    records: list[dict] = []
    while time.monotonic() < deadline and not records:
        time.sleep(0.5)
        for path in (_serve_log_dir() / "serve").glob("replica_medtune_*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if '"medtune_adapter"' in line:
                    records.append(json.loads(line))
    ok = [r for r in records if r["medtune_adapter"] == "ner" and r["medtune_status"] == 200]
    assert ok, records[:3]
    record = ok[-1]
    for key in ("medtune_latency_s", "medtune_prompt_tokens", "medtune_completion_tokens", "medtune_adapter_version"):
        assert key in record
    assert record["medtune_completion_tokens"] > 0 and record["medtune_latency_s"] > 0
    assert any(r["medtune_status"] == 422 for r in records)
    leaked = [
        str(p)
        for p in _serve_log_dir().rglob("*")
        if p.is_file()
        and (
            PHI_MARKER in p.read_text(errors="replace")
            or (len(completion) > 8 and completion in p.read_text(errors="replace"))
        )
    ]
    assert leaked == []


def test_per_adapter_metrics_are_exported_to_prometheus(server):
    import ray

    for name in ("ner", "qa"):
        assert http("POST", server.url("/v1/chat/completions"), chat_body(name, PROMPTS[0], 4)).status == 200
    port = ray._private.worker._global_node.metrics_export_port
    wanted = [
        "ray_medtune_requests_total",
        "ray_medtune_request_latency_seconds_bucket",
        "ray_medtune_time_to_first_token_seconds_bucket",
        "ray_medtune_generated_tokens_total",
        "ray_medtune_adapter_loads_total",
    ]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = http("GET", f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted) and 'adapter="qa"' in text:
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert missing == [], text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith("ray_medtune_requests_total")]
    assert any('adapter="ner"' in line and 'status="200"' in line for line in lines), lines
    assert any('adapter="qa"' in line for line in lines), lines

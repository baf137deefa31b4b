"""The continuous-batching engine (no Ray): every row answers as if it were alone.

Rows join a running batch between tokens, leave when they end, and each passes through its
own adapter's stacked LoRA weights. The oracle is plain PEFT `generate`, one request at a time:
greedy answers must be token for token the same, whatever the batch around them.
"""

from __future__ import annotations

import threading

import pytest

from helpers import Oracle, make_adapter
from ray_jobs.core.recipe import ModelConfig
from ray_jobs.serve.engines.base import AdapterLoadError, GenerationRequest
from ray_jobs.serve.engines.hf_continuous import ContinuousEngine
from ray_jobs.serve.engines.lora_bank import read_adapter

PROMPTS = [
    "The patient has diabetes",
    "Prescribed metformin twice daily",
    "Chest pain and fever",
    "SDTM domain AE",
    "Adverse event: headache",
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("continuous-adapters")
    return {
        "qkvo@v1": make_adapter(tiny_llama_dir, root / "qkvo", seed=1, rank=8),
        "mlp-rank4@v1": make_adapter(tiny_llama_dir, root / "mlp", seed=2, rank=4, targets=["gate_proj", "down_proj"]),
        "rslora@v1": make_adapter(
            tiny_llama_dir,
            root / "rslora",
            seed=3,
            rank=16,
            targets="all-linear",
            use_rslora=True,
            alpha_pattern={"v_proj": 3},
        ),
    }


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):
    return Oracle(tiny_llama_dir)


def new_engine(tiny_llama_dir, **options) -> ContinuousEngine:
    return ContinuousEngine(
        str(tiny_llama_dir), ModelConfig(base=str(tiny_llama_dir), dtype="fp32"), device="cpu", **options
    )


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, adapters):
    engine = new_engine(tiny_llama_dir, max_loaded_adapters=4, max_batch_size=8)
    for key, path in adapters.items():
        engine.ensure_adapter(key, str(path))
    return engine


def request_for(oracle, adapters, key, prompt, max_tokens=12, **options) -> GenerationRequest:
    return GenerationRequest(
        oracle.prompt_ids(prompt, chat=True),
        key,
        max_tokens,
        adapter_path=str(adapters[key]) if key else None,
        **options,
    )


def expected(oracle, adapters, key, prompt, max_tokens=12) -> str:
    ids = oracle.answer_ids(adapters[key] if key else None, oracle.prompt_ids(prompt, chat=True), max_tokens)
    return oracle.tokenizer.decode(ids, skip_special_tokens=True)


def test_a_mixed_batch_answers_each_row_as_its_adapter_alone_would(engine, oracle, adapters):
    keys = [None, *adapters]  # the base model and every adapter, prompts of different lengths
    jobs = [(keys[i % len(keys)], prompt) for i, prompt in enumerate(PROMPTS * 2)]
    results = engine.generate([request_for(oracle, adapters, key, prompt) for key, prompt in jobs])

    answers = {expected(oracle, adapters, key, PROMPTS[0]) for key in keys}
    assert len(answers) == len(keys), "the adapters must answer differently for this test to mean anything"
    for (key, prompt), result in zip(jobs, results):
        assert result.text == expected(oracle, adapters, key, prompt), (key, prompt)
        assert result.finish_reason in ("length", "stop")


def test_rows_joining_a_running_batch_do_not_change_anyones_answer(engine, oracle, adapters):
    long_request = request_for(oracle, adapters, "qkvo@v1", PROMPTS[1], max_tokens=60)
    tokens, produced = [], threading.Event()

    def on_token(token: int, logprob) -> None:
        tokens.append(token)
        if len(tokens) == 20:
            produced.set()

    long_request.on_token = on_token
    first = engine.submit(long_request)
    # The long row is 20 tokens in, so its cache is far wider than the joiners' prompts: they are
    # left-padded into it and must still count their positions from their own first token.
    assert produced.wait(60)
    joiners = [
        engine.submit(request_for(oracle, adapters, key, prompt, max_tokens=8))
        for key, prompt in [("mlp-rank4@v1", PROMPTS[2]), (None, PROMPTS[3]), ("rslora@v1", PROMPTS[4])]
    ]

    assert first.result(120).text == expected(oracle, adapters, "qkvo@v1", PROMPTS[1], max_tokens=60)
    for future, (key, prompt) in zip(
        joiners, [("mlp-rank4@v1", PROMPTS[2]), (None, PROMPTS[3]), ("rslora@v1", PROMPTS[4])]
    ):
        assert future.result(120).text == expected(oracle, adapters, key, prompt, max_tokens=8)


def test_more_requests_than_the_batch_holds_wait_their_turn_and_all_finish(engine, oracle, adapters):
    requests = [request_for(oracle, adapters, "mlp-rank4@v1", PROMPTS[i % 5], max_tokens=3 + i % 4) for i in range(20)]
    results = engine.generate(requests)
    assert [r.completion_tokens <= 3 + i % 4 for i, r in enumerate(results)] == [True] * 20
    assert all(
        r.text == expected(oracle, adapters, "mlp-rank4@v1", PROMPTS[i % 5], 3 + i % 4) for i, r in enumerate(results)
    )
    assert engine.rows == [] and engine.cache is None  # nothing left behind once idle


def test_a_seeded_sampled_answer_does_not_depend_on_its_batch(engine, oracle, adapters):
    def sampled(companions: int) -> str:
        request = request_for(
            oracle, adapters, "qkvo@v1", PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=1234
        )
        others = [
            request_for(oracle, adapters, None, PROMPTS[i % 5], max_tokens=16, temperature=1.0)
            for i in range(companions)
        ]
        return engine.generate([*others, request])[-1].text

    assert sampled(0) == sampled(5)
    unseeded = {
        engine.generate([request_for(oracle, adapters, "qkvo@v1", PROMPTS[0], max_tokens=16, temperature=1.5)])[0].text
        for _ in range(4)
    }
    assert len(unseeded) > 1


def test_a_stop_string_or_a_cancel_ends_the_row_early(engine, oracle, adapters):
    full = expected(oracle, adapters, "qkvo@v1", PROMPTS[2], max_tokens=30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    result = engine.generate([request_for(oracle, adapters, "qkvo@v1", PROMPTS[2], max_tokens=30, stop=[stop])])[0]
    assert result.finish_reason == "stop" and result.text == full[: full.index(stop)]
    assert result.completion_tokens < 30

    request = request_for(oracle, adapters, None, PROMPTS[0], max_tokens=10_000)
    request.on_token = lambda token, logprob: setattr(request, "cancelled", True)
    assert engine.submit(request).result(60).finish_reason == "cancelled"


def test_the_least_recently_used_idle_adapter_is_evicted_and_reloaded_on_demand(tiny_llama_dir, oracle, adapters):
    engine = new_engine(tiny_llama_dir, max_loaded_adapters=2, max_batch_size=4)
    for key in ("qkvo@v1", "mlp-rank4@v1", "rslora@v1"):
        engine.ensure_adapter(key, str(adapters[key]))
    assert list(engine.loaded) == ["mlp-rank4@v1", "rslora@v1"] and engine.stats["evictions"] == 1
    result = engine.generate([request_for(oracle, adapters, "qkvo@v1", PROMPTS[0])])[0]  # evicted: reloaded
    assert result.text == expected(oracle, adapters, "qkvo@v1", PROMPTS[0])
    assert "qkvo@v1" in engine.loaded and engine.stats["loads"] == 4


def test_adapters_in_use_are_never_evicted_and_a_full_bank_is_a_clear_error(tiny_llama_dir, oracle, adapters):
    engine = new_engine(tiny_llama_dir, max_loaded_adapters=1, max_batch_size=4)
    engine.ensure_adapter("qkvo@v1", str(adapters["qkvo@v1"]))
    running = request_for(oracle, adapters, "qkvo@v1", PROMPTS[0], max_tokens=10_000)
    with engine.wakeup:  # the decode loop cannot admit it while we hold this: it stays queued
        future = engine.submit(running)
        with pytest.raises(AdapterLoadError, match="queued or running requests need"):
            engine.ensure_adapter("mlp-rank4@v1", str(adapters["mlp-rank4@v1"]))
        running.cancelled = True
    assert future.result(60).finish_reason == "cancelled"
    engine.ensure_adapter("mlp-rank4@v1", str(adapters["mlp-rank4@v1"]))  # idle now: evictable
    assert list(engine.loaded) == ["mlp-rank4@v1"]


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="lora_only"), "biases"),
    ],
)
def test_adapters_the_bank_cannot_apply_exactly_are_refused_with_the_way_out(tmp_path, tiny_llama_dir, options, reason):
    folder = make_adapter(tiny_llama_dir, tmp_path / "odd", seed=5, rank=4, targets=["q_proj"], **options)
    with pytest.raises(AdapterLoadError, match=reason) as caught:
        read_adapter(folder)
    assert "serve.batching: mixed" in str(caught.value)


def test_an_adapter_for_another_architecture_fails_alone(engine, tmp_path, tiny_llama_dir, oracle, adapters):
    import json

    folder = make_adapter(tiny_llama_dir, tmp_path / "foreign", seed=6, rank=4, targets=["q_proj"])
    from safetensors.torch import load_file, save_file

    tensors = {
        k.replace("self_attn.q_proj", "attention.query"): v
        for k, v in load_file(folder / "adapter_model.safetensors").items()
    }
    save_file(tensors, folder / "adapter_model.safetensors")
    json.loads((folder / "adapter_config.json").read_text())
    with pytest.raises(AdapterLoadError, match="no linear layer"):
        engine.ensure_adapter("foreign@v1", str(folder))
    assert "foreign@v1" not in engine.loaded
    assert engine.generate([request_for(oracle, adapters, "qkvo@v1", PROMPTS[3])])[0].text == expected(
        oracle, adapters, "qkvo@v1", PROMPTS[3]
    )


def test_the_static_peft_engine_answers_mixed_batches_like_the_oracle_too(tiny_llama_dir, oracle, adapters):
    """serve.batching: mixed (PEFT adapter_names=) stays available for adapters the bank refuses."""
    from ray_jobs.serve.engines.hf_static import StaticEngine

    engine = StaticEngine(str(tiny_llama_dir), ModelConfig(base=str(tiny_llama_dir), dtype="fp32"), device="cpu")
    keys = [None, "qkvo@v1", "mlp-rank4@v1"]
    for key in keys[1:]:
        engine.ensure_adapter(key, str(adapters[key]))
    jobs = [(keys[i % 3], prompt) for i, prompt in enumerate(PROMPTS)]
    results = engine.generate([request_for(oracle, adapters, key, prompt) for key, prompt in jobs])
    for (key, prompt), result in zip(jobs, results):
        assert result.text == expected(oracle, adapters, key, prompt), (key, prompt)


@pytest.mark.parametrize(
    "damage, reason",
    [
        ({"adapter_config.json": b"{not json"}, "adapter_config.json is unreadable"),
        ({"adapter_model.safetensors": b"\x00garbage" * 10}, "adapter_model.safetensors is unreadable"),
    ],
)
def test_a_corrupt_adapter_is_refused_with_the_file_that_is_broken(tmp_path, tiny_llama_dir, damage, reason):
    folder = make_adapter(tiny_llama_dir, tmp_path / "corrupt", seed=7, rank=4, targets=["q_proj"])
    for name, content in damage.items():
        (folder / name).write_bytes(content)
    with pytest.raises(AdapterLoadError, match=reason):
        read_adapter(folder)


@pytest.mark.parametrize(
    "lora, expected",
    [
        ({}, []),
        ({"use_dora": True}, ["lora.use_dora"]),
        ({"modules_to_save": ["score"], "bias": "lora_only"}, ["lora.modules_to_save", "lora.bias"]),
    ],
)
def test_a_recipe_whose_adapters_the_bank_cannot_apply_is_served_by_peft(tiny_llama_dir, lora, expected):
    from ray_jobs.core.engines import recipe_lora_blockers
    from ray_jobs.core.recipe import parse_recipe
    from ray_jobs.serve.engines.hf_static import StaticEngine
    from ray_jobs.serve.engines.hf_streams import hf_engine

    recipe = parse_recipe(
        {
            "name": "x",
            "model": {"base": str(tiny_llama_dir), "dtype": "fp32"},
            "data": {"format": "qa", "train": "qa.jsonl"},
            "lora": lora,
        }
    )
    assert recipe_lora_blockers(recipe) == expected
    engine = hf_engine(str(tiny_llama_dir), recipe, recipe.model, lambda *event: None)
    assert isinstance(engine, StaticEngine if expected else ContinuousEngine)


def test_a_sliding_window_cache_is_refused_from_the_config_before_any_weights_load():
    from transformers import LlamaConfig, MistralConfig

    from ray_jobs.serve.engines.hf_continuous import UnsupportedModelError, check_cache_layout

    check_cache_layout(LlamaConfig(num_hidden_layers=2))  # plain layers: accepted
    with pytest.raises(UnsupportedModelError, match="DynamicSlidingWindowLayer.*serve.batching: mixed"):
        check_cache_layout(MistralConfig(num_hidden_layers=2, sliding_window=64))


@pytest.mark.parametrize("same_input", [True, False])
def test_siblings_share_one_lora_matmul_only_when_they_read_the_same_input(same_input):
    """q/k/v (and gate/up) keep their A sides in one tensor and multiply once per forward; a
    sibling called with another tensor must not reuse that product."""
    import torch

    from ray_jobs.serve.engines.lora_bank import LoRABank

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = torch.nn.Linear(8, 6), torch.nn.Linear(8, 4)

        def forward(self, x, y):
            return torch.cat([self.q_proj(x), self.k_proj(y)], dim=-1)

    torch.manual_seed(0)
    model = Attention()
    generator = torch.Generator().manual_seed(1)
    weights = {
        name: (torch.randn(3, 8, generator=generator), torch.randn(out, 3, generator=generator))
        for name, out in (("q_proj", 6), ("k_proj", 4))
    }
    bank = LoRABank(model, slots=3)
    bank.check(weights)
    bank.write(2, weights)
    assert bank.groups["q_proj"] is bank.groups["k_proj"], "q and k should share one A tensor"
    x = torch.randn(2, 5, 8)
    y = x if same_input else torch.randn(2, 5, 8)
    with torch.no_grad():
        base = model(x, y)
        bank.set_rows([2, 0])  # row 0 through the adapter, row 1 the base model
        adapted = model(x, y)
        bank.release_inputs()
    delta_q = x[0] @ weights["q_proj"][0].T @ weights["q_proj"][1].T
    delta_k = y[0] @ weights["k_proj"][0].T @ weights["k_proj"][1].T
    torch.testing.assert_close(adapted[0], base[0] + torch.cat([delta_q, delta_k], dim=-1))
    torch.testing.assert_close(adapted[1], base[1])


def test_decoding_on_gpu_leaves_cudnn_attention_out_and_cpu_untouched():
    """cuDNN's SDPA builds a plan per key length, i.e. per decoding step (see decoding_attention)."""
    import torch

    from ray_jobs.core.modeling import decoding_attention

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with decoding_attention("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled()
    with decoding_attention("cuda:0"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()

"""The training speed-ups must not change what is learned.

- `varlen` attention hands packed rows' document boundaries to flash attention on GPU; on
  CPU the same boundaries run through per-document SDPA. Either way a packed row scores and
  back-propagates exactly like the sdpa path with its document mask, and like the documents
  one by one. (The CUDA kernel itself is checked on the GPU by the benchmark's loss guard:
  benchmarks/train_throughput.py.)
- `gradient_checkpointing: auto` checkpoints only as many layers as memory needs; any
  subset gives the very same gradients.
- Quantised bases are not cast to fp32 around the 4-bit weights (PEFT's
  prepare_model_for_kbit_training would cast them); the base stays frozen all the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_jobs.core import attention
from ray_jobs.core.modeling import collate, summed_loss
from ray_jobs.core.recipe import RecipeError, parse_recipe
from ray_jobs.preprocess.tokenize import pack_documents
from ray_jobs.train.model_setup import (
    build_model,
    enable_checkpointing,
    layers_to_checkpoint,
    optimizer_bytes_per_param,
)


def random_documents(lengths, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for length in lengths:
        ids = torch.randint(5, 600, (length,), generator=generator).tolist()
        docs.append((ids, [-100] * (length // 3) + ids[length // 3 :]))
    return docs


def packed_batch(docs, width: int):
    rows = pack_documents(docs, max_seq_len=width)
    return collate({k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids")}, pad_id=0)


def load(model_dir: Path, attn: str):
    from transformers import AutoModelForCausalLM

    attention.register()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    total, count = summed_loss(model, *batch)
    (total / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()), count, grads


def test_document_bounds_split_rows_where_positions_restart():
    # Row 0: documents of 3 and 2 tokens; row 1: one of 4 then 1 pad token (its own "document").
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    cumulative, longest = attention.document_bounds(positions)
    assert cumulative.tolist() == [0, 3, 5, 9, 10]
    assert cumulative.dtype == torch.int32 and longest == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_varlen_attention_scores_and_trains_packed_rows_exactly_like_sdpa(tmp_path_factory, arch: str):
    """Grouped-query heads (4 query, 2 key/value), several rows, documents of many lengths."""
    from ray_jobs.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path_factory.mktemp(arch) / "model", arch)
    docs = random_documents((37, 61, 18, 90, 5, 120, 44))
    batch = packed_batch(docs, width=160)
    assert batch[0].shape[0] >= 2, "the test needs several packed rows"

    torch.manual_seed(0)
    sdpa = load(model_dir, "sdpa")
    torch.manual_seed(0)
    varlen = load(model_dir, attention.NAME)
    assert varlen.config._attn_implementation == attention.NAME
    s_loss, s_count, s_grads = loss_and_grads(sdpa, batch)
    v_loss, v_count, v_grads = loss_and_grads(varlen, batch)
    assert v_count == s_count
    assert v_loss == pytest.approx(s_loss, rel=1e-5)
    assert s_grads.keys() == v_grads.keys()
    for name, grad in s_grads.items():
        torch.testing.assert_close(v_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    one_by_one = 0.0
    with torch.no_grad():
        for ids, labels in docs:
            total, _ = summed_loss(varlen, *collate({"input_ids": [ids], "labels": [labels]}, pad_id=0))
            one_by_one += float(total)
    assert v_loss == pytest.approx(one_by_one, rel=1e-4)


def test_varlen_attention_refuses_generation_with_a_cache(tiny_llama_dir: Path):
    model = load(tiny_llama_dir, attention.NAME).eval()
    with pytest.raises(ValueError, match="load the model with sdpa for generation"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)


def test_varlen_attention_treats_each_unpacked_row_as_one_document(tiny_llama_dir: Path):
    """Called without position_ids, transformers passes one [1, S] arange for the whole batch:
    every row is then a single document, as sdpa attends too."""
    ids = torch.randint(5, 600, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = load(tiny_llama_dir, "sdpa").eval()(input_ids=ids).logits
        got = load(tiny_llama_dir, attention.NAME).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def attend(batch: int = 2, width: int = 6, **kwargs):
    """The varlen forward on random q/k/v (4 query heads, 2 key/value heads)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, 4, width, 8, generator=generator)
    key, value = (torch.randn(batch, 2, width, 8, generator=generator) for _ in range(2))
    return attention.varlen_attention_forward(None, query, key, value, None, **kwargs)


@pytest.mark.parametrize("shape", [(2, 6), (3, 5), (3, 2, 6)], ids=["fewer-rows", "other-width", "3d-multimodal"])
def test_varlen_attention_refuses_position_ids_that_do_not_match_the_rows(shape):
    positions = torch.arange(shape[-1]).expand(*shape)
    with pytest.raises(ValueError, match=r"position_ids of shape .* do not match the query's 3 rows of 6 tokens"):
        attend(batch=3, width=6, position_ids=positions)
    out, _ = attend(batch=3, width=6, position_ids=torch.arange(6).expand(3, 6))
    assert out.shape == (3, 6, 4, 8)


@pytest.mark.parametrize("setting", [{"sliding_window": 4}, {"softcap": 50.0}])
def test_varlen_attention_refuses_a_sliding_window_or_softcap_instead_of_ignoring_it(setting):
    positions = torch.arange(6).expand(2, 6)
    with pytest.raises(ValueError, match=rf"cannot apply {next(iter(setting))}=.*model.attn_implementation: auto"):
        attend(position_ids=positions, **setting)
    attend(position_ids=positions, sliding_window=None, softcap=None)  # what Llama-style layers pass


def test_a_sliding_window_model_loaded_with_varlen_by_hand_fails_at_its_first_forward():
    """transformers hands the window to the attention function: varlen must not drop it."""
    from transformers import AutoModelForCausalLM, MistralConfig

    attention.register()
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.NAME)
    with pytest.raises(ValueError, match="sliding_window=16"):
        model(input_ids=torch.randint(0, 64, (1, 20)), position_ids=torch.arange(20)[None])


def test_auto_attention_is_varlen_only_where_the_flash_kernel_runs():
    from transformers import LlamaConfig

    llama = LlamaConfig()
    assert attention.training_attention("auto", torch.device("cpu"), llama) == "sdpa"
    assert attention.training_attention("varlen", torch.device("cpu"), llama) == attention.NAME
    assert attention.training_attention("eager", None, llama) == "eager"
    # Evaluation and serving decode with a KV cache.
    assert attention.inference_attention("auto") == attention.inference_attention("varlen") == "sdpa"
    assert attention.inference_attention("flex_attention") == "flex_attention"


def model_configs():
    from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    return {
        # (config, what `auto` picks on a GPU where the flash kernel runs)
        "llama": (LlamaConfig(), attention.NAME),
        "qwen2": (Qwen2Config(), attention.NAME),  # use_sliding_window: false, as Qwen2.5 ships
        "mistral-v0.3": (MistralConfig(sliding_window=None), attention.NAME),
        "mistral-v0.1": (MistralConfig(sliding_window=4096), "sdpa"),
        "qwen2-windowed": (Qwen2Config(use_sliding_window=True, num_hidden_layers=4, max_window_layers=2), "sdpa"),
        "gemma3": (Gemma3TextConfig(), "sdpa"),
        "gemma3-multimodal": (Gemma3Config(), "sdpa"),
        "gemma2": (Gemma2Config(), "eager"),  # softcapped logits: sdpa has no softcap either
    }


@pytest.mark.parametrize("arch", list(model_configs()))
def test_auto_attention_keeps_sliding_window_and_softcapped_models_off_varlen(monkeypatch, arch: str):
    config, expected = model_configs()[arch]
    monkeypatch.setattr(attention, "available_on", lambda device: True)  # as on an H100
    assert attention.training_attention("auto", torch.device("cuda"), config) == expected
    if expected == attention.NAME:
        assert attention.training_attention("varlen", torch.device("cuda"), config) == attention.NAME
    else:
        with pytest.raises(ValueError, match=rf"model.attn_implementation: varlen .*; use auto or {expected}"):
            attention.training_attention("varlen", torch.device("cuda"), config)
    # Evaluation and serving decode with sdpa, or eager where the model softcaps its logits.
    assert attention.inference_attention("auto", config) == ("sdpa" if expected == attention.NAME else expected)


@pytest.mark.parametrize("reentrant", [False, True], ids=["bf16-base", "quantised-base"])
def test_checkpointing_a_subset_of_layers_spreads_them_and_keeps_gradients_identical(
    tiny_llama_dir: Path, reentrant: bool
):
    """Quantised bases use reentrant checkpointing, which silently drops the gradients of a
    layer whose input does not require grad: the LoRA weights must get them all the same."""
    from peft import LoraConfig, get_peft_model
    from transformers.modeling_layers import GradientCheckpointingLayer

    def lora_model():
        torch.manual_seed(0)
        base = load(tiny_llama_dir, "sdpa")
        for param in base.parameters():
            param.requires_grad = False
        return get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        ).train()

    docs = random_documents((40, 70, 25), seed=1)
    batch = packed_batch(docs, width=160)
    _, _, expected = loss_and_grads(lora_model(), batch)
    assert len(expected) == 16  # 4 layers x 2 modules x (A, B)
    for layers in (1, 2, 4):
        model = lora_model()
        assert enable_checkpointing(model, quantized=reentrant, layers=layers) == layers
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert sum(flags) == layers and flags[0], flags
        if layers == 2:
            assert flags == [True, False, True, False]  # spread over the depth, not the first two
        _, _, grads = loss_and_grads(model, batch)
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_short_run_has_the_same_loss_curve_packed_with_varlen_as_document_by_document(tiny_llama_dir: Path):
    """The optimised path (packed rows, varlen attention, half the layers checkpointed) and the
    plain one (each document alone, sdpa, no checkpointing) take the same optimizer steps
    over the same documents with the same token-weighted loss: their curves coincide."""
    from peft import LoraConfig, get_peft_model

    # Counting sequences from different starts: learnable, so the curve really falls.
    docs = []
    for i in range(24):
        ids = [5 + (i * 7 + j) % 60 for j in range(17 + (i * 37) % 90)]
        docs.append((ids, [-100] * (len(ids) // 3) + ids[len(ids) // 3 :]))
    groups = [docs[i : i + 3] for i in range(0, len(docs), 3)]  # one packed row per step

    def lora_model(attn: str):
        torch.manual_seed(0)
        base = load(tiny_llama_dir, attn)
        for param in base.parameters():
            param.requires_grad = False
        return get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )

    def curve(model, step_loss) -> list[float]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for group in groups:
            total, count = step_loss(model, group)
            (total / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(total.detach()) / count)
        return losses

    def packed(model, group):
        return summed_loss(model, *packed_batch(group, width=512))

    def one_by_one(model, group):
        parts = [
            summed_loss(model, *collate({"input_ids": [ids], "labels": [labels]}, pad_id=0)) for ids, labels in group
        ]
        return sum(total for total, _ in parts), sum(count for _, count in parts)

    optimised = lora_model(attention.NAME).train()
    enable_checkpointing(optimised, quantized=False, layers=2)
    fast = curve(optimised, packed)
    plain = curve(lora_model("sdpa").train(), one_by_one)
    assert fast == pytest.approx(plain, rel=2e-4)
    assert plain[-1] < plain[0] - 0.05, "the run must learn, or matching curves prove nothing"


@pytest.mark.parametrize(
    ("peak", "budget", "logits", "expected"),
    [
        (30, 40, 0, 0),  # fits: no recompute at all
        (50, 40, 0, 11),  # 32 layers share 32 GiB of activations: free 10 GiB -> 10 layers, + 1 for the inputs kept
        (50, 41.5, 0, 10),  # rounds up, never under-checkpoints
        (90, 15, 0, 32),  # more than all the activations: every layer
        # 16 of the 32 GiB are logits, which checkpointing never frees: each layer frees 0.5 GiB,
        # not 1, so freeing 10 GiB takes 20 layers (+ 1), twice what spreading the logits gave.
        (50, 40, 16, 21),
        (50, 49.9, 0, 2),  # just over: the one-layer margin
    ],
)
def test_auto_checkpoints_enough_layers_to_fit_the_budget(peak, budget, logits, expected):
    gib = 2**30
    assert (
        layers_to_checkpoint(peak=peak * gib, static=18 * gib, layers=32, budget=budget * gib, logits=logits * gib)
        == expected
    )


def test_optimizer_states_count_deepspeeds_fp32_master_copy_partitioned_over_workers():
    assert optimizer_bytes_per_param(deepspeed=False, workers=4) == 8  # AdamW moments on every DDP worker
    assert optimizer_bytes_per_param(deepspeed=True, workers=1) == 12  # + fp32 master weights
    assert optimizer_bytes_per_param(deepspeed=True, workers=4) == 3  # ZeRO-2 partitions all of it


def test_a_memory_limit_must_be_positive_and_is_named_when_wrong():
    recipe = {"name": "x", "model": {"base": "tiny:llama"}, "data": {"format": "entities", "train": ["a.json"]}}
    assert parse_recipe({**recipe, "train": {"max_gpu_memory_gib": 30}}).train.max_gpu_memory_gib == 30
    with pytest.raises(RecipeError, match="train.max_gpu_memory_gib"):
        parse_recipe({**recipe, "train": {"max_gpu_memory_gib": 0}})


def bf16_lora_cfg(model_dir: Path, **lora) -> dict:
    """build_model's config for LoRA on a bf16 base (4-bit needs a GPU; bf16 shows the same on CPU)."""
    return {
        "model_dir": str(model_dir),
        "recipe": {
            "model": {
                "base": str(model_dir),
                "quantization": "none",
                "dtype": "bf16",
                "attn_implementation": "auto",
                "quant": {"type": "nf4", "double_quant": True, "compute_dtype": "bf16"},
            },
            "lora": {
                "r": 4,
                "alpha": 8,
                "dropout": 0.0,
                "bias": "none",
                "targets": "attention",
                "modules_to_save": [],
                "use_rslora": False,
                "use_dora": False,
                **lora,
            },
            "train": {"method": "lora", "gradient_checkpointing": True, "liger_kernels": False, "micro_batch_size": 1},
            "data": {"max_seq_len": 128},
        },
    }


def test_the_frozen_base_keeps_its_dtype_and_only_lora_weights_train(tiny_llama_dir: Path):
    """What prepare_model_for_kbit_training would have done, less the fp32 cast (checked in
    bf16 on CPU; 4-bit needs a GPU). The LoRA weights are PEFT's fp32 ones."""
    model = build_model(bf16_lora_cfg(tiny_llama_dir), None, zero3=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_dtypes = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen_dtypes == {torch.bfloat16}


def test_modules_to_save_copies_train_in_fp32_beside_the_bf16_base(tiny_llama_dir: Path):
    """PEFT copies modules_to_save in the base's bf16, where AdamW's small updates round away:
    like the LoRA weights, they train in fp32 (under autocast, as on a GPU)."""
    model = build_model(
        bf16_lora_cfg(tiny_llama_dir, modules_to_save=["lm_head"], allow_unservable_modules=True), None, zero3=False
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    copies = {n: p for n, p in trainable.items() if "modules_to_save" in n}
    assert list(copies) == ["base_model.model.lm_head.modules_to_save.default.weight"]
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}

    before = {n: p.detach().clone() for n, p in copies.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, count = summed_loss(model.train(), *packed_batch(random_documents((40, 70)), width=128))
    (total / count).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    optimizer.step()
    for name, param in copies.items():
        assert not torch.equal(param, before[name]), name


def test_a_token_budget_per_step_sets_grad_accum_from_workers_and_row_length():
    recipe = {
        "name": "x",
        "model": {"base": "tiny:llama"},
        "data": {"format": "entities", "train": ["a.json"], "max_seq_len": 4096},
    }
    two_workers = parse_recipe({**recipe, "train": {"tokens_per_step": 65536, "workers": 2}})
    assert two_workers.train.grad_accum == 8  # 65,536 / (2 workers x 1 row x 4,096 tokens)
    four_workers = parse_recipe({**recipe, "train": {"tokens_per_step": 65536, "workers": 4}})
    assert four_workers.train.grad_accum == 4  # same tokens per step on twice the workers
    # A dumped recipe (what workers, lineage and `medtune submit` carry) parses to the same.
    again = parse_recipe(two_workers.model_dump(mode="json"))
    assert again.train.grad_accum == 8 and again.recipe_hash() == two_workers.recipe_hash()

    with pytest.raises(RecipeError, match=r"train.tokens_per_step: gives grad_accum 16, but train.grad_accum is 4"):
        parse_recipe({**recipe, "train": {"tokens_per_step": 65536, "grad_accum": 4}})
    with pytest.raises(RecipeError, match=r"train.tokens_per_step: 1000 is less than one forward pass"):
        parse_recipe({**recipe, "train": {"tokens_per_step": 1000}})

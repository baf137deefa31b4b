"""The seed recipes in configs/: each loads, and each says what its seed says.

The five seed workloads (/work/shared/seeds/*.txt) name their hyper-parameters; a recipe
that drifts from them (a rank edited, a batch size "tidied") is a silent regression, so
every value the seed names is pinned here next to the seed's own wording. Values the seed
leaves open are the recipe's choice and are not pinned.

A second set of tests feeds one record in each seed's own data layout through the format
adapter with the recipe's data section, so a recipe whose columns, format or prompts do
not fit its seed's data fails here, not after a GPU job has quarantined every row.
Unit tier: no Ray, no network, no GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ray_jobs.core.recipe import Recipe, load_recipe
from ray_jobs.preprocess.formats import to_conversation
from ray_jobs.train.loop import LORA_TARGETS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL_RECIPES = sorted(p for p in CONFIGS.rglob("*.y*ml") if "deepspeed" not in p.relative_to(CONFIGS).parts)

ATTENTION = set(LORA_TARGETS["attention"])
ATTENTION_MLP = ATTENTION | set(LORA_TARGETS["mlp"])

SDTM = "sdtm/qwen2.5-14b-qlora.yaml"
QA = "medical-qa/mistral-7b-qlora.yaml"
REASONING = "reasoning/llama3.1-8b-qlora.yaml"
ENTITIES = "entities/llama3.1-8b-lora.yaml"
AUDIENCES = ("general", "patient", "doctor", "emergency")
AUDIENCE_RECIPES = {a: f"audience/llama3.1-8b-{a}-lora.yaml" for a in AUDIENCES}

ELARA_PROMPT = (
    "You are Elara, a professional medical AI assistant trained to provide accurate, "
    "evidence-based information. Answer with compassion and clarity."
)
# seed 004, format_for_instruction_tuning: `system_instruction += " You are communicating ..."`
ELARA_SUFFIX = {
    "general": "",
    "patient": " You are communicating with a patient, so use patient-friendly language and avoid excessive medical jargon.",
    "doctor": " You are communicating with a medical professional, so use appropriate technical terminology.",
    "emergency": "",  # no branch for it in the seed: falls through to the shared prompt
}
NER_PROMPT = (
    "You are a medical entity extractor from clinical texts. Extract the entities from the "
    "text and return them in a structured JSON format."
)

# recipe -> {dotted key: value the seed names}. The comment on each line quotes the seed.
EXPECTED: dict[str, dict[str, Any]] = {
    SDTM: {  # seed 000, SDTM Mapper Instruction Tuning Package
        "model.base": "Qwen/Qwen2.5-14B-Instruct",  # "Model selection (default: Qwen/Qwen2.5-14B-Instruct)"
        "model.quantization": "4bit",  # "The training uses QLoRA (4-bit quantization)"
        "train.method": "lora",  # QLoRA = LoRA on the 4-bit base
        "train.micro_batch_size": 4,  # "Effective batch size: 32 (4 * 8 gradient accumulation)"
        "train.grad_accum": 8,  # idem
        "data.max_seq_len": 2048,  # "Max sequence length: 2048 tokens"
        "data.format": "instruction",  # {"instruction", "input", "output", "metadata"}
        "data.instruction_role": "system",  # "instruction": "System prompt describing the task"
        "data.columns.metadata": "metadata",  # metadata.step feeds per-step accuracy
        "eval.metrics": ["perplexity", "sdtm"],
    },
    QA: {  # seed 001, Medical AI Model Training Guide
        "model.quantization": "4bit",  # "--use-qlora: Use 4-bit quantization"
        "train.method": "lora",
        "lora.r": 16,  # "r: 16 (rank)"
        "lora.alpha": 32,  # "alpha: 32 (scaling)"
        "lora.dropout": 0.05,  # "dropout: 0.05"
        "train.epochs": 3,  # "Epochs: 3"
        "train.micro_batch_size": 4,  # "Batch Size: 4"
        "train.lr": 2e-4,  # "Learning Rate: 2e-4"
        "data.max_seq_len": 2048,  # "Max Sequence Length: 2048"
        "train.grad_accum": 4,  # "Gradient Accumulation: 4"
        "data.format": "qa",  # Q&A pairs, safety refusals, emergency escalation, triage
        "eval.metrics": ["perplexity", "qa_safety"],
        "model.base": "mistralai/Mistral-7B-v0.1",  # "--model mistralai/Mistral-7B-v0.1" (the base model)
    },
    REASONING: {  # seed 002, Medical SFT Pipeline (HuatuoGPT-o1 style)
        "model.base": "meta-llama/Llama-3.1-8B-Instruct",  # "Fine-tune Llama 3.1-8B-Instruct"
        "model.quantization": "4bit",  # "Quantization: 4-bit (nf4)"
        "model.quant.type": "nf4",  # idem
        "train.method": "lora",
        "lora.r": 16,  # "Rank: 16"
        "lora.alpha": 32,  # "Alpha: 32"
        "train.micro_batch_size": 1,  # "Batch size: 1 (gradient accumulation: 8)"
        "train.grad_accum": 8,  # idem
        "train.lr": 2e-4,  # "Learning rate: 2e-4"
        "data.max_seq_len": 2048,  # "Max sequence length: 2048"
        "data.format": "reasoning",  # {"question", "complex_cot", "response"}
        # "## Thinking\n[Step-by-step medical reasoning]\n\n## Final Response\n[Concise medical answer]"
        "data.reasoning_template": "## Thinking\n\n{cot}\n\n## Final Response\n\n{response}",
        "eval.metrics": ["perplexity", "format"],
    },
    ENTITIES: {  # seed 003, Unsloth entity extraction (values of train_eval_model_unsloth.sh)
        "model.base": "meta-llama/Llama-3.1-8B-Instruct",  # MODEL_NAME=unsloth/Llama-3.1-8B-Instruct (same weights)
        "model.quantization": "4bit",  # MODEL_LOAD_IN_4BIT=true
        "train.method": "lora",  # MODEL_FULL_FINETUNING=false
        "lora.r": 8,  # PEFT_RANK=8
        "lora.alpha": 16,  # PEFT_LORA_ALPHA=16
        "lora.dropout": 0.0,  # PEFT_LORA_DROPOUT=0.0
        "lora.bias": "none",  # PEFT_LORA_BIAS=false
        "data.max_seq_len": 4096,  # MODEL_MAX_SEQ_LENGTH=4096
        "train.micro_batch_size": 4,  # TRAIN_PER_DEVICE_BATCH_SIZE=4
        "train.grad_accum": 4,  # TRAIN_GRADIENT_ACCUMULATION_STEPS=4
        "train.epochs": 10,  # TRAIN_NUM_EPOCHS=10
        "train.lr": 2e-4,  # TRAIN_LEARNING_RATE=2e-4
        "train.weight_decay": 0.01,  # TRAIN_WEIGHT_DECAY=0.01
        "train.warmup_steps": 5,  # TRAIN_WARMUP_STEPS=5
        "train.scheduler": "linear",  # TRAIN_LR_SCHEDULER_TYPE=linear
        "train.seed": 42,  # TRAIN_SEED=42
        "data.system_prompt": NER_PROMPT,  # SYSTEM_PROMPT="You are a medical entity extractor ..."
        "data.unique_entities": True,  # UNIQUE_ENTITIES=true
        "data.format": "entities",  # {"text": ..., "entities": [{"label", "text"}]}
        "eval.batch_size": 4,  # --eval-batch-size ${TRAIN_PER_DEVICE_BATCH_SIZE}
        "eval.generation.temperature": 1.5,  # Llama models: "temperature = 1.5"
        "eval.generation.min_p": 0.1,  # Llama models: "min_p = 0.1"
        "eval.metrics": ["perplexity", "entities"],
    },
}
DIALOGPT_DOCTOR = "audience/dialogpt-medium-doctor-lora.yaml"
for _audience, _path in [*AUDIENCE_RECIPES.items(), ("doctor", DIALOGPT_DOCTOR)]:
    EXPECTED[_path] = {  # seed 004, Elara AI: medical_professional_lora.json / patient_lora.json
        "model.quantization": "none",  # plain LoRA ("fp16": true, no quantisation)
        "train.method": "lora",
        "lora.r": 16,  # "r": 16
        "lora.alpha": 32,  # "alpha": 32
        "lora.dropout": 0.1,  # "dropout": 0.1
        "lora.bias": "none",  # "bias": "none"
        "train.epochs": 3,  # "num_train_epochs": 3
        "train.micro_batch_size": 4,  # "per_device_train_batch_size": 4
        "train.grad_accum": 2,  # "gradient_accumulation_steps": 2
        "train.lr": 2e-4,  # "learning_rate": 2e-4
        "train.weight_decay": 0.01,  # "weight_decay": 0.01
        "train.warmup_steps": 100,  # "warmup_steps": 100
        "train.log_every": 10,  # "logging_steps": 10
        "train.eval_every": 50,  # "eval_steps": 50
        "train.checkpoint_every": 50,  # "save_steps": 50
        "data.max_seq_len": 512,  # tokenizer(..., truncation=True, max_length=512)
        "data.truncation": "truncate",  # truncation=True
        "data.format": "qa",  # data['question'], data['answer']
        "data.system_prompt": ELARA_PROMPT,  # system_instruction = "You are Elara, ..."
        "data.audience.default": _audience,  # "Training Multiple LoRA Adapters": one per audience
        "name": f"elara-{_audience}" + ("-dialogpt" if _path == DIALOGPT_DOCTOR else ""),
    }
EXPECTED[DIALOGPT_DOCTOR] |= {
    "model.base": "microsoft/DialoGPT-medium",  # "base_model": "microsoft/DialoGPT-medium"
    "lora.targets": ["c_attn", "c_proj"],  # "target_modules": ["c_attn", "c_proj"]
}


def _get(recipe: Recipe, dotted: str) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _load(relative: str) -> Recipe:
    return load_recipe(CONFIGS / relative)


def _modules(targets: str | list[str]) -> set[str] | str:
    """Module names a LoRA target spec adapts ("all-linear" stays as is: it depends on the model)."""
    if isinstance(targets, list):
        return set(targets)
    return set(LORA_TARGETS[targets]) if targets in LORA_TARGETS else targets


# --------------------------------------------------------------------------- every recipe loads
@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_recipe_loads(path: Path):
    recipe = load_recipe(path)
    assert recipe.name


def test_every_seed_recipe_exists_and_is_pinned():
    shipped = {str(p.relative_to(CONFIGS)) for p in ALL_RECIPES}
    assert set(EXPECTED) <= shipped, f"missing seed recipes: {sorted(set(EXPECTED) - shipped)}"
    seed_dirs = ("sdtm", "medical-qa", "reasoning", "entities", "audience")
    unpinned = {p for p in shipped if p.split("/")[0] in seed_dirs} - set(EXPECTED)
    assert not unpinned, f"seed recipes without expected values in this test: {sorted(unpinned)}"


# --------------------------------------------------------------------------- the seed's numbers
@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_recipe_uses_the_hyper_parameters_its_seed_names(relative: str):
    recipe = _load(relative)
    wrong = {}
    for dotted, expected in EXPECTED[relative].items():
        actual = _get(recipe, dotted)
        if isinstance(expected, float) and isinstance(actual, (int, float)):
            ok = actual == pytest.approx(expected)
        else:
            ok = actual == expected
        if not ok:
            wrong[dotted] = (actual, expected)
    assert not wrong, f"{relative}: (actual, seed) differ: {wrong}"


def test_lora_targets_are_the_seeds_modules():
    # seed 001: target_modules ["q_proj", "v_proj", "k_proj", "o_proj"]
    assert _modules(_load(QA).lora.targets) == ATTENTION
    # seed 002: "Target modules: q_proj, k_proj, v_proj, o_proj"
    assert _modules(_load(REASONING).lora.targets) == ATTENTION
    # seed 003: PEFT_FT_ATTENTION_MODULES=true, PEFT_FT_MLP_MODULES=true (all-linear on Llama is exactly those)
    assert _modules(_load(ENTITIES).lora.targets) in ("all-linear", ATTENTION_MLP)
    # seed 004: ["c_attn", "c_proj"] on GPT-2 = fused q/k/v, attn.c_proj (o) and mlp.c_proj (down)
    for relative in AUDIENCE_RECIPES.values():
        assert _modules(_load(relative).lora.targets) == ATTENTION | {"down_proj"}, relative


def test_qlora_recipes_quantise_to_nf4_with_bf16_compute():
    for relative in (SDTM, QA, REASONING, ENTITIES):
        model = _load(relative).model
        assert (model.quantization, model.quant.type, model.quant.compute_dtype) == ("4bit", "nf4", "bf16"), relative


def test_the_issue_bases_and_one_base_for_every_audience():
    assert _load(SDTM).model.base == "Qwen/Qwen2.5-14B-Instruct"
    assert "Mistral-7B" in _load(QA).model.base
    bases = {_load(relative).model.base for relative in AUDIENCE_RECIPES.values()}
    assert len(bases) == 1, bases
    served = set(_load(AUDIENCE_RECIPES["doctor"]).serve.adapters)
    assert served == {f"elara-{a}" for a in AUDIENCES}


def test_seed_recipes_train_on_gpu_and_store_off_the_machine():
    for relative in EXPECTED:
        recipe = _load(relative)
        assert recipe.train.gpus_per_worker >= 1, relative
        assert recipe.storage.root.startswith("s3://"), relative
        assert recipe.data.packing, relative


# --------------------------------------------------------------------------- the seed's data layout
def _convert(relative: str, record: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any]]:
    return to_conversation(record, _load(relative).data)


def test_sdtm_row_instruction_becomes_system_and_step_reaches_evaluation():
    record = {  # seed 000, "Dataset Format"
        "instruction": "You are an SDTM annotator. Select the SDTM domain.",
        "input": "Field label: Adverse event term",
        "output": "Domain: AE",
        "metadata": {"step": "domain_selection", "domain": "AE", "pattern": "direct", "field_label": "AETERM"},
    }
    messages, meta = _convert(SDTM, record)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == record["instruction"]
    assert messages[1]["content"] == record["input"]
    assert meta["step"] == "domain_selection"


def test_qa_row_keeps_its_category_for_the_safety_metric():
    record = {
        "question": "How much ibuprofen can I take with warfarin?",
        "answer": "Please talk to your doctor or pharmacist before combining them.",
        "category": "safety_refusal",
    }
    messages, meta = _convert(QA, record)
    assert messages[-1]["content"] == record["answer"]
    assert meta["category"] == "safety_refusal"


@pytest.mark.parametrize(
    "record",
    [
        {"question": "Q?", "complex_cot": "Think.", "response": "Answer."},  # seed 002's "Format"
        {"Question": "Q?", "Complex_CoT": "Think.", "Response": "Answer."},  # the raw medical_o1_sft.json
    ],
    ids=["seed-layout", "hub-file-layout"],
)
def test_reasoning_row_becomes_thinking_then_final_response(record: dict[str, str]):
    messages, meta = _convert(REASONING, record)
    assert messages[-1]["content"] == "## Thinking\n\nThink.\n\n## Final Response\n\nAnswer."
    assert meta["final_response"] == "Answer."


def test_entities_row_becomes_the_seed_system_prompt_and_json_answer():
    record = {
        "text": "Prescribed metformin 500mg twice daily.",  # seed 003, "Training Data Format"
        "entities": [
            {"label": "Medication", "text": "metformin"},
            {"label": "Dosage", "text": "500mg"},
            {"label": "Frequency", "text": "twice daily"},
            {"label": "Medication", "text": "metformin"},
        ],
    }
    messages, meta = _convert(ENTITIES, record)
    assert messages[0] == {"role": "system", "content": NER_PROMPT}
    answer = json.loads(messages[-1]["content"])
    assert len(answer["entities"]) == 3  # UNIQUE_ENTITIES=true drops the repeated metformin
    assert meta["entities"] == answer["entities"]


@pytest.mark.parametrize("audience", AUDIENCES)
def test_audience_row_gets_exactly_the_seed_system_prompt(audience: str):
    record = {"question": "What is hypertension?", "answer": "Blood pressure that stays too high over time."}
    messages, meta = _convert(AUDIENCE_RECIPES[audience], record)
    assert messages[0] == {"role": "system", "content": ELARA_PROMPT + ELARA_SUFFIX[audience]}
    assert meta["audience"] == audience

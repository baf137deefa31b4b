"""The recipe's `serve` section: the endpoint, its replicas and admission, and the engine
behind it (vLLM's settings in `serve.vllm`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ray_jobs.core.section import NonNegativeInt, PositiveInt, Section


class VLLMConfig(Section):
    """vLLM's engine settings (serve.engine: vllm, or auto on a GPU with vLLM installed)."""

    max_loras: PositiveInt | None = None
    """Adapters one batch may mix (vLLM's GPU LoRA slots). Empty: the number of serve.adapters
    (at most 16), or 4 when none are listed."""
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = None
    """Largest adapter rank served. Empty: the smallest vLLM value that covers lora.r and the
    ranks of serve.adapters (read at start-up)."""
    max_cpu_loras: PositiveInt | None = None
    """Adapters vLLM keeps in host memory. Empty: max(max_loras, serve.max_loaded_adapters)."""
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    """Share of the GPU's memory vLLM may take (weights, KV cache, CUDA graphs)."""
    max_model_len: PositiveInt | None = None
    """Context length served. Empty: the model's own."""
    max_num_seqs: PositiveInt | None = None
    """Sequences decoded together. Empty: vLLM's default for the GPU."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (system prompts, few-shot examples)."""
    enforce_eager: bool = False
    """Skip CUDA graphs and torch.compile (faster start-up, slower decoding)."""
    json_whitespace: bool = True
    """Let response_format JSON answers put whitespace between tokens, as the model chooses
    (what adapters trained on `json.dumps` output expect). Off: compact JSON only, fewer tokens,
    and no whitespace a weak model can repeat until max_tokens."""


class ServeConfig(Section):
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """auto: vLLM when it is importable and the replica has a GPU (and the recipe's adapters are
    plain LoRA), else hf. vllm: refuse to start without it. hf: transformers + PEFT, CPU or GPU
    (the continuous engine, or PEFT's static batches per serve.batching)."""
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    keep_quantization: bool = False
    """Serve a quantised recipe's adapters on the 4-bit base it trained on. Off: on the
    unquantised base, the usual practice (better answers, faster decoding, more memory)."""
    adapters: list[str] = Field(default_factory=list)
    """Adapters to load at start-up (others load on first request)."""
    max_loaded_adapters: PositiveInt = 8
    """LRU bound on adapters held in memory per replica."""
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    route_prefix: str = "/"
    min_replicas: NonNegativeInt = 1
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveInt = 16
    max_ongoing_requests: PositiveInt = 64
    """Requests a replica works on at once (at most max_batch_size generate together; the
    others wait in its engine's queue)."""
    max_queued_requests: PositiveInt = 256
    """Requests a replica holds beyond max_ongoing_requests; past both, a request gets an
    OpenAI-style 503 JSON error with Retry-After."""
    retry_after_s: PositiveInt = 1
    """Seconds a client is told to wait (Retry-After) after a 503 for a full queue."""
    request_timeout_s: Annotated[float, Field(gt=0)] = 120
    """Seconds a request may wait and generate; beyond it the answer is a 504 JSON error and the
    generation stops (a stream ends with an error event)."""
    max_batch_size: PositiveInt = 32
    """HF engine: rows generated together on a replica; further requests wait their turn in
    order (vLLM: serve.vllm.max_num_seqs)."""
    stream_interval_s: Annotated[float, Field(ge=0, le=5)] = 0.0
    """Streaming: the least time between two chunks of one answer (the first is sent at once);
    tokens generated meanwhile travel together. 0: a chunk as soon as tokens are there. Raise
    it when many streams share a replica: every chunk costs its event loop (benchmarks/README.md)."""
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = 0.01
    """mixed / per_adapter only: how long @serve.batch waits to fill a batch."""
    batching: Literal["continuous", "mixed", "per_adapter"] = "continuous"
    """The HF engine's batching (vLLM batches continuously itself). continuous: requests join and leave the running batch between tokens, every row with its
    own adapter through stacked LoRA weights (ray_jobs.serve.engines.hf_continuous; plain LoRA only);
    mixed: static @serve.batch batches, one PEFT generate call whatever the adapters
    (adapter_names=; also DoRA and modules_to_save adapters);
    per_adapter: static batches split into one call per adapter, as Serve's multiplexing
    would split them (for comparison)."""
    gpus_per_replica: Annotated[float, Field(ge=0)] = 0
    cpus_per_replica: Annotated[float, Field(ge=0)] = 1
    """Ray CPUs reserved per replica (the HTTP handling and, without a GPU, the model itself)."""
    served_model_name: str | None = None
    """Name clients use for the base model in `model`; empty: model.base."""
    adapter_refresh_s: Annotated[float, Field(ge=0)] = 5.0
    """How long a replica trusts its list of an adapter's versions before re-reading storage:
    the delay before a newly published version answers requests for the bare name."""
    api_keys_file: str | None = None
    """File with one accepted API key per line (a mounted Kubernetes secret); empty: no auth."""
    log_prompts: bool = False
    """Log prompt and completion text. Off by default: they may hold PHI."""

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

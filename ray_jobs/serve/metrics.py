"""Per-adapter Prometheus metrics and PHI-free request logs of the Serve app.

Metrics go through `ray.serve.metrics`, so Ray adds the deployment, replica and application
tags and exports them on every node's metrics port (`ray_medtune_*` in Prometheus; the
KubeRay PodMonitor scrapes them). Each metric carries an `adapter` tag: the adapter's name
(not its version, which would grow the series without bound), or `base`.

Request logs are one record per request on the `ray.serve` logger, whose replica log file
Serve writes as JSON (the app's `logging_config`); the fields below become JSON keys.
Prompt and completion text are left out unless `serve.log_prompts` is true: they may hold PHI.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("ray.serve")

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
BASE_TAG = "base"
UNRESOLVED_TAG = "unresolved"
"""Tag of requests rejected before their model was resolved (bad names must not become series)."""


@dataclass
class RequestRecord:
    """What one request did, for metrics and the request log. Never holds PHI unless
    `prompt`/`completion` are filled, which only happens with serve.log_prompts."""

    endpoint: str
    adapter: str = UNRESOLVED_TAG
    adapter_version: str | None = None
    status: int = 200
    error_code: str | None = None
    stream: bool = False
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    user: str | None = None
    """A hash of the request's `user` field, never the value."""
    prompt: Any = field(default=None, repr=False)
    completion: str | None = field(default=None, repr=False)

    def log_fields(self, log_prompts: bool) -> dict[str, Any]:
        fields = {f"medtune_{k}": v for k, v in asdict(self).items() if k not in ("prompt", "completion")}
        if log_prompts:
            fields["medtune_prompt"], fields["medtune_completion"] = self.prompt, self.completion
        return fields


class ServeMetrics:
    """The app's Prometheus metrics; create one per replica (inside the Serve actor)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        tags = ("adapter",)
        self.requests = Counter(
            "medtune_requests",
            description="Requests answered, by adapter and HTTP status.",
            tag_keys=("adapter", "status"),
        )
        self.latency = Histogram(
            "medtune_request_latency_seconds",
            description="Request latency (end to end).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tags,
        )
        self.ttft = Histogram(
            "medtune_time_to_first_token_seconds",
            description="Time to first generated token.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tags,
        )
        self.generated_tokens = Counter(
            "medtune_generated_tokens", description="Completion tokens generated.", tag_keys=tags
        )
        self.prompt_tokens = Counter("medtune_prompt_tokens", description="Prompt tokens processed.", tag_keys=tags)
        self.adapter_loads = Counter(
            "medtune_adapter_loads", description="Adapters loaded into a replica.", tag_keys=tags
        )
        self.adapter_load_seconds = Histogram(
            "medtune_adapter_load_seconds",
            description="Adapter load time.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tags,
        )
        self.adapter_evictions = Counter(
            "medtune_adapter_evictions", description="Adapters evicted (LRU bound).", tag_keys=tags
        )

    def record_request(self, record: RequestRecord) -> None:
        tags = {"adapter": record.adapter}
        self.requests.inc(1, tags={**tags, "status": str(record.status)})
        self.latency.observe(record.latency_s, tags=tags)
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s, tags=tags)
        if record.completion_tokens:
            self.generated_tokens.inc(record.completion_tokens, tags=tags)
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens, tags=tags)

    def record_adapter_event(self, kind: str, key: str, seconds: float) -> None:
        """Engine callback: ("load", "name@version", seconds) or ("evict", key, 0)."""
        tags = {"adapter": key.partition("@")[0]}
        if kind == "load":
            self.adapter_loads.inc(1, tags=tags)
            self.adapter_load_seconds.observe(seconds, tags=tags)
        elif kind == "evict":
            self.adapter_evictions.inc(1, tags=tags)


def log_request(record: RequestRecord, log_prompts: bool) -> None:
    """One structured log line per request (JSON keys under Serve's JSON log encoding)."""
    log.info(
        "medtune request %s %s -> %s",
        record.endpoint,
        record.adapter,
        record.status,
        extra=record.log_fields(log_prompts),
    )

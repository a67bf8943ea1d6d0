"""Gateway settings (env prefix CRUCIBLE_GATEWAY_). Defaults are the dev defaults."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_GATEWAY_", extra="ignore")

    port: int = 8080
    database_url: str | None = None  # default: SQLite under var/
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Inference backends (vLLM servers). Several may serve one model: requests go to the one with
    # the fewest outstanding requests, and fail over before the first byte.
    inference_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000"])
    routing_refresh_s: float = 5.0
    alias_refresh_s: float = 1.0  # how soon every gateway routes by a changed alias
    quota_refresh_s: float = 10.0  # how soon every gateway learns an owner's stored-data quota
    # Crucible's own services behind the gateway (sent the internal token and the key's owner).
    retrieval_url: str = "http://127.0.0.1:8001"
    finetune_url: str = "http://127.0.0.1:8002"
    agent_url: str = "http://127.0.0.1:8003"
    # Sent to the backends if they were started with --api-key (never the client's key).
    inference_api_key: SecretStr | None = None

    def inference_headers(self) -> list[tuple[bytes, bytes]]:
        if self.inference_api_key is None:
            return []
        return [(b"authorization", b"Bearer " + self.inference_api_key.get_secret_value().encode())]

    # Bounded everything: a body, a request's cost, and how long anything may take.
    max_body_bytes: int = 4 << 20
    # File uploads (/v1/files) only; the retrieval service enforces the same cap.
    max_upload_bytes: int = 64 << 20
    upload_timeout_s: float = 300.0
    max_tokens_cap: int = 8192
    max_n: int = 8
    # /v1/completions: sequences per request, and their size without tokenizing (characters of
    # text prompts, token ids of pre-tokenized ones); logit_bias entries on any route.
    max_prompts: int = 64
    max_prompt_chars: int = 1 << 20
    max_prompt_token_ids: int = 256 << 10
    max_logit_bias: int = 300
    max_top_logprobs: int = 20
    max_schema_bytes: int = 64 << 10
    connect_timeout_s: float = 1.0
    # A client must deliver its whole body within this, or get 408: slow uploads cannot hold
    # connections open indefinitely.
    body_timeout_s: float = 30.0
    # One total deadline per request (streams included), spent across failover attempts.
    request_timeout_s: float = 600.0
    # A stream (or forwarded body) silent this long between two reads fails at once, instead of
    # holding its slot until the deadline. Long enough for a queued request's first token.
    stream_idle_timeout_s: float = 120.0
    # How a stream's events reach the client. "direct": from the upstream connection's read
    # callback straight into the client's socket, framed as uvicorn frames them (no task wakes
    # up per token; bench/streaming.py measures both); "asgi": one ASGI send per read. "direct"
    # falls back to "asgi" where the server is not uvicorn's httptools protocol.
    stream_relay: Literal["direct", "asgi"] = "direct"

    # Defaults for keys created without their own limits.
    default_rpm: int = 600
    default_max_concurrency: int = 32
    # Across all keys, per gateway process: beyond it, 429 at once instead of a queue.
    max_concurrency: int = 512
    # Bytes of request bodies one key may hold in flight in a gateway process (uploads count):
    # beyond it, 429 at once. Two largest uploads by default.
    max_key_bytes_in_flight: int = 128 << 20
    # A Redis outage: "open" admits requests without the per-minute limit (concurrency caps, which
    # are local and exact, still bound the load); "closed" answers 503 until Redis is back.
    rate_limit_on_redis_error: Literal["open", "closed"] = "open"
    key_cache_ttl_s: float = 5.0
    key_last_used_every_s: float = 30.0  # how often keys' last use is written (listings show it)
    # Stored completions wait in Redis (a stream, AOF) for the finetune service to keep them:
    # at most this many there, and this many in this process while Redis is away; beyond
    # either, new ones are dropped and counted (crucible_outbox_dropped_total).
    capture_stream_max: int = 100_000
    capture_buffer: int = 10_000

    # Dollar budgets price a request's tokens by this list, USD per million tokens, in the form
    # of the finetune service's hosted list: {"model or *": {"input": 0.15, "output": 0.6}} ("*"
    # for every model without its own entry; a fine-tuned model is priced as its base; a price
    # not given is 0). Empty: budgets can be set in tokens only.
    budget_prices: dict[str, dict[str, float]] = Field(default_factory=dict)

    @field_validator("budget_prices")
    @classmethod
    def _prices(cls, table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for model, price in table.items():
            unknown = set(price) - {"input", "output", "training"}
            if unknown:
                raise ValueError(f"{model}: unknown price {sorted(unknown)} (input, output)")
            if not all(math.isfinite(v) and v >= 0 for v in price.values()):
                raise ValueError(f"{model}: a price is a finite number >= 0")
        return table

    def db_url(self) -> str:
        return self.database_url or self.sqlite_url("gateway")

"""Fine-tuning settings (env prefix CRUCIBLE_FINETUNE_); the API and the worker share them."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceSettings
from services.finetune.training import ALL_LINEAR


class FinetuneSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_FINETUNE_", extra="ignore")

    port: int = 8002
    database_url: str | None = None  # default: SQLite under var/
    # Celery's broker; Redis with AOF on, so queued jobs survive a Redis restart.
    redis_url: str = "redis://127.0.0.1:6379/1"
    queue: str = "finetune"  # a worker's: the queue it takes jobs from (its GPU class's)
    # GPU classes: the queue each base model's jobs go to, one per class of worker (each class's
    # workers set `queue` to theirs), e.g. {"qwen3-32b": "finetune-96gb", "*": "finetune-32gb"};
    # a fine-tuned model's jobs go where its base's do; a model not listed, to "*" or `queue`.
    queue_by_model: dict[str, str] = Field(default_factory=dict)
    # Training files are read from the retrieval service, as their owner.
    retrieval_url: str = "http://127.0.0.1:8001"
    # Where agent runs are (their usage is read from it when they end).
    agent_url: str = "http://127.0.0.1:8003"
    # vLLM servers that serve the fine-tuned adapters (loaded through their internal LoRA route).
    inference_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000"])
    inference_api_key: SecretStr | None = None  # vLLM's --api-key (compose sets one)
    models_dir: Path | None = None  # default: var/models
    adapters_dir: Path | None = None  # default: var/adapters; vLLM must see the same path
    # What the served engine accepts (its --max-lora-rank and the modules vLLM can adapt).
    max_lora_rank: int = 16
    supported_target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR))
    base_learning_rate: float = 2e-4  # times the job's learning_rate_multiplier
    checkpoint_every: int = 50
    keep_checkpoints: int = 3  # per job, the newest on disk (each holds the optimizer's state)
    # Bytes of fine-tuning output (adapters and checkpoints) one owner may hold; a new job past
    # it is 429 insufficient_quota until models are deleted (DELETE /v1/models/{model}).
    owner_adapter_bytes: int = 20 << 30
    # Bytes of stored completions and responses one owner may hold; past it, the gateways
    # refuse requests that would store more (429 insufficient_quota) until some are deleted.
    # Summed at most every stored_quota_every_s, so an owner may pass it by that long's worth.
    owner_stored_bytes: int = 10 << 30
    stored_quota_every_s: float = 10.0
    # The cost model (README, "Costs"): what the lab's machine costs per second of an engine's
    # busy time, from its price amortized over its life, its power and its hosting, shared
    # equally by the engines it runs. All zero until the lab sets them.
    cost_hardware_usd: float = Field(default=0.0, ge=0)
    cost_amortization_years: float = Field(default=3.0, gt=0)
    cost_power_watts: float = Field(default=0.0, ge=0)  # average draw while serving
    cost_kwh_usd: float = Field(default=0.0, ge=0)
    cost_hosting_usd_month: float = Field(default=0.0, ge=0)
    cost_engines: int = Field(default=1, ge=1)
    # A hosted API's prices to compare with, USD per million tokens: {"model or *": {"input":
    # 0.15, "output": 0.6}} ("*" for every model without its own entry; embeddings: "input").
    cost_hosted_prices: dict[str, dict[str, float]] = Field(default_factory=dict)
    # How often the bytes each project's vector stores hold are recorded (the storage usage),
    # and how often the agent's ended runs are read (their usage).
    usage_snapshot_every_s: float = Field(default=300.0, gt=0)
    usage_runs_every_s: float = Field(default=15.0, gt=0)

    def queue_for(self, model: str) -> str:
        """The queue a job on `model` goes to (its GPU class's)."""
        if model.startswith("ft:") and model not in self.queue_by_model:
            model = model.split(":")[1]
        return self.queue_by_model.get(model) or self.queue_by_model.get("*") or self.queue

    def queues(self) -> list[str]:
        """Every queue a job can go to: each needs a live worker."""
        routed = set(self.queue_by_model.values())
        return sorted(routed if "*" in self.queue_by_model else routed | {self.queue})

    def engine_usd_per_second(self) -> float:
        """What one second of one engine's busy time costs the lab."""
        year, month = 365.25 * 86_400, 30.4375 * 86_400
        box = (
            self.cost_hardware_usd / (self.cost_amortization_years * year)
            + self.cost_power_watts / 1000 * self.cost_kwh_usd / 3600
            + self.cost_hosting_usd_month / month
        )
        return box / self.cost_engines

    max_examples: int = 100_000
    # The longest example in tokens (within the base model's context): longer ones fail
    # validation, naming their line.
    max_example_tokens: int = 2048
    # While the retrieval service (where training files live) is unreachable, reading a file
    # retries this long; then the job fails, saying why.
    files_retry_s: float = 120.0
    # Liveness: a running job's worker beats every heartbeat_s; a job whose beat is older than
    # stale_after_s is resumed elsewhere from its last checkpoint (the broker's visibility
    # timeout is hours long, so recovery cannot wait for it).
    heartbeat_s: float = 2.0
    stale_after_s: float = 15.0
    reconcile_every_s: float = 3.0
    max_attempts: int = 3
    visibility_timeout_s: int = 12 * 3600
    # A worker process, busy or idle, beats in Redis every third of this; the API is ready only
    # while some worker on its queue has beaten within it (a dead worker made jobs queue forever
    # behind a green /ready).
    worker_alive_s: float = 6.0
    worker_metrics_port: int = 8012
    # Evaluation runs (evalworker.py): model calls go through the gateway as the run's key.
    gateway_url: str = "http://127.0.0.1:8080"
    eval_runs: int = 2  # runs at once per eval worker
    eval_concurrency: int = 8  # items in flight per run
    eval_heartbeat_s: float = 1.0
    eval_stale_after_s: float = 10.0  # a run whose worker is this silent is taken over
    eval_poll_s: float = 0.5
    eval_call_timeout_s: float = 300.0
    eval_worker_metrics_port: int = 8014
    # The gateway's Redis, where its capture outbox (stored completions) waits for this service.
    captures_redis_url: str = "redis://127.0.0.1:6379/0"
    alias_guard_every_s: float = 2.0  # how often each guarded alias is judged

    def inference_headers(self) -> dict[str, str]:
        if self.inference_api_key is None:
            return {}
        return {"authorization": f"Bearer {self.inference_api_key.get_secret_value()}"}

    def db_url(self) -> str:
        return self.database_url or self.sqlite_url("finetune")

    def models(self) -> Path:
        return self.models_dir or self.var_dir / "models"

    def adapters(self) -> Path:
        return self.adapters_dir or self.var_dir / "adapters"

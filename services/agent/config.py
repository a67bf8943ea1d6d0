"""Agent settings (env prefix CRUCIBLE_AGENT_). Defaults are the dev defaults."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceSettings


class AgentSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_AGENT_", extra="ignore")

    port: int = 8003
    database_url: str | None = None  # default: SQLite under var/
    # The model is called through the gateway, as the run's key; documents through retrieval.
    gateway_url: str = "http://127.0.0.1:8080"
    retrieval_url: str = "http://127.0.0.1:8001"
    # Models served with a tool-call parser (vLLM --enable-auto-tool-choice): mode "auto" uses
    # native tool calling for these and structured mode (json_schema actions) for the rest.
    native_tool_models: list[str] = Field(default_factory=list)
    temperature: float = 0.0
    step_max_tokens: int = 1024  # one model call's completion at most
    # Budgets: the defaults of a run that sets none, and the most a run may ask for. A run's
    # seconds stay under the gateway's request deadline (600 s), so a streamed run is never cut.
    default_max_steps: int = 8
    default_max_tokens: int = 16_384
    default_max_seconds: float = 120.0
    max_steps_cap: int = 50
    max_tokens_cap: int = 200_000
    max_seconds_cap: float = 590.0
    # Runs executing at once: per service process and per owner; beyond them, 429.
    max_active_runs: int = 64
    max_active_runs_per_owner: int = 16
    # RDKit sandbox: worker processes, per-call timeout, address-space cap, molecule size cap.
    chem_workers: int = 2
    chem_timeout_s: float = 5.0
    chem_memory_mb: int = 1024
    chem_max_atoms: int = 1000
    max_body_bytes: int = 1 << 20

    def db_url(self) -> str:
        return self.database_url or self.sqlite_url("agent")

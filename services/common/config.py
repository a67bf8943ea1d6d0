"""Settings base: one pydantic-settings class per service, each with its own env prefix."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# Repository root: the dev defaults (var/, models) are relative to it.
ROOT = Path(__file__).resolve().parents[2]
VAR = ROOT / "var"

# What a sandboxed child process (RDKit workers, training) may inherit: how to run Python and
# numeric libraries, never a service's settings. The internal token, database and Redis URLs
# stay behind.
_CHILD_ENV = re.compile(
    r"PATH|HOME|LANG|LC_\w+|TZ|TMPDIR|VIRTUAL_ENV|PYTHON(PATH|HOME|HASHSEED|UNBUFFERED)"
    r"|OMP_NUM_THREADS|OPENBLAS_\w+|MKL_NUM_THREADS"
)


def scrubbed_env(also: str | None = None) -> dict[str, str]:
    """The environment for a child that runs untrusted input: an allow-list of the parent's,
    plus the names `also` matches (a regular expression)."""
    extra = re.compile(also) if also else None
    return {
        k: v
        for k, v in os.environ.items()
        if _CHILD_ENV.fullmatch(k) or (extra is not None and extra.fullmatch(k))
    }


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set `model_config` with their own `env_prefix`."""

    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 0
    log_level: str = "INFO"
    # Shared secret between the gateway and the services behind it (DESIGN.md, Auth).
    internal_token: SecretStr = Field(
        default=SecretStr("dev-internal-token"), validation_alias="CRUCIBLE_INTERNAL_TOKEN"
    )
    var_dir: Path = Field(default=VAR, validation_alias="CRUCIBLE_VAR_DIR")
    # Where spans go (OTLP/HTTP; none: traces are propagated, not recorded), and the share of
    # new traces recorded (a caller's sampled trace is always followed).
    otlp_endpoint: str | None = Field(default=None, validation_alias="CRUCIBLE_OTLP_ENDPOINT")
    trace_sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, validation_alias="CRUCIBLE_TRACE_SAMPLE_RATIO"
    )
    max_body_bytes: int = 1 << 20

    def sqlite_url(self, name: str) -> str:
        """The embedded default database of a service, under var/."""
        return f"sqlite:///{self.var_dir / f'{name}.db'}"

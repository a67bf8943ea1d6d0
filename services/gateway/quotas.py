"""Owners whose stored completions and responses reached their quota, as the finetune service
(which stores them) reports; their requests that would store more are refused at once."""

from __future__ import annotations

from typing import Any

from services.common.errors import QuotaExceeded
from services.gateway.polled import Polled


class StoredQuotas(Polled):
    path = "/internal/quotas"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.quota = 0
        self.over: dict[str, int] = {}

    def load(self, body: Any) -> None:
        over = {str(owner): int(n) for owner, n in body["over"].items()}
        self.quota, self.over = int(body["stored_bytes_quota"]), over

    def refusal(self, owner: str) -> QuotaExceeded:
        """The 429 `insufficient_quota` for an owner in `over`."""
        return QuotaExceeded(
            f"the stored completions and responses of this owner use {self.over[owner]:,} of "
            f"{self.quota:,} bytes; send `store: false`, or delete stored ones "
            "(DELETE /v1/chat/completions/{id}, DELETE /v1/responses/{id})"
        )

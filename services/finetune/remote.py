"""What the finetune service asks of the others, as a key or an owner: whether a model answers
for a key (the gateway), whether a vector store is the owner's (retrieval)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from services.common.errors import InvalidRequest
from services.common.tenancy import internal_headers

KEY_ID_HEADER = "x-crucible-key-id"
ADMIN_HEADER = "x-crucible-admin"  # set by the gateway for an admin key; trusted on internal auth


def model_available(s: Any, key_id: str, model: str, param: str) -> None:
    """The model answers for this key through the gateway (a judge or a sampled model), else 400."""
    try:
        r = httpx.get(
            f"{s.gateway_url}/v1/models/{quote(model, safe='')}",
            headers={
                "authorization": f"Bearer {s.internal_token.get_secret_value()}",
                KEY_ID_HEADER: key_id,
            },
            timeout=10,
        )
    except httpx.HTTPError:
        raise InvalidRequest(f"could not check model {model!r}: the gateway is away") from None
    if r.status_code != 200:
        raise InvalidRequest(
            f"model {model!r} is not served or not available to this key",
            param=param,
            code="model_not_found",
        )


def store_available(s: Any, owner: str, store_id: str, param: str) -> None:
    """A vector store a grader or an agent searches is the owner's, else 400."""
    try:
        r = httpx.get(
            f"{s.retrieval_url}/v1/vector_stores/{quote(store_id, safe='')}",
            headers=internal_headers(s.internal_token, owner),
            timeout=10,
        )
    except httpx.HTTPError:
        raise InvalidRequest("could not check the vector store: retrieval is away") from None
    if r.status_code != 200:
        raise InvalidRequest(f"no vector store {store_id!r}", param=param)

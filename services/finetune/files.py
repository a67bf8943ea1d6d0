"""Training files live in the retrieval service; this reads them as their owner."""

from __future__ import annotations

from urllib.parse import quote

import httpx
from pydantic import SecretStr

from services.common.errors import InvalidRequest, NotFound
from services.common.tenancy import internal_headers


def file_info(base_url: str, token: SecretStr, owner: str, file_id: str) -> dict[str, object]:
    r = httpx.get(
        f"{base_url}/v1/files/{quote(file_id, safe='')}",
        headers=internal_headers(token, owner),
        timeout=10,
    )
    if r.status_code in (400, 404):  # 400: a value no file id can be (a NUL, say)
        raise NotFound(f"No such File object: {file_id}", param="training_file")
    r.raise_for_status()
    info: dict[str, object] = r.json()
    if info.get("purpose") != "fine-tune":
        raise InvalidRequest(
            f"file {file_id} was not uploaded with purpose 'fine-tune'", param="training_file"
        )
    return info


def file_text(base_url: str, token: SecretStr, owner: str, file_id: str) -> str:
    r = httpx.get(
        f"{base_url}/v1/files/{quote(file_id, safe='')}/content",
        headers=internal_headers(token, owner),
        timeout=60,
    )
    r.raise_for_status()
    return r.content.decode("utf-8-sig")


def upload_file(base_url: str, token: SecretStr, owner: str, name: str, text: str) -> str:
    """A new `fine-tune` file of the owner's in /v1/files; returns its id."""
    r = httpx.post(
        f"{base_url}/v1/files",
        headers=internal_headers(token, owner),
        files={"file": (name, text.encode(), "application/jsonl")},
        data={"purpose": "fine-tune"},
        timeout=120,
    )
    r.raise_for_status()
    file_id: str = r.json()["id"]
    return file_id

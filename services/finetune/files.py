"""Training files live in the retrieval service; this reads them as their owner."""

from __future__ import annotations

import time
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


class FilesUnavailable(Exception):
    """The files service stayed unreachable (or failing) for the whole retry window."""


RETRYABLE = {429, 500, 502, 503, 504}
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0


def file_text(
    base_url: str, token: SecretStr, owner: str, file_id: str, retry_s: float = 0.0
) -> str:
    """A file's text, as its owner. While the retrieval service is unreachable or failing, try
    again (0.5 s doubling to 10 s) for up to `retry_s`; then FilesUnavailable saying why. An
    unknown file is NotFound."""
    deadline = time.monotonic() + retry_s
    delay = RETRY_FIRST_S
    while True:
        try:
            r = httpx.get(
                f"{base_url}/v1/files/{quote(file_id, safe='')}/content",
                headers=internal_headers(token, owner),
                timeout=60,
            )
            if r.status_code not in RETRYABLE:
                break
            why = f"it answered {r.status_code}"
        except httpx.TransportError as exc:
            why = type(exc).__name__
        if time.monotonic() + delay > deadline:
            raise FilesUnavailable(
                f"the files service was unreachable for {retry_s:g} s ({why}); "
                "create the job again once it is back"
            )
        time.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_S)
    if r.status_code in (400, 404):
        raise NotFound(f"No such File object: {file_id}", param="training_file")
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

"""File types: what an upload may be, and the text a file holds.

Uploads are checked when they arrive (type by extension, then by content), so a file that is
accepted can later be parsed; parsing happens during ingestion, off the event loop.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Literal

from services.common import jsonl
from services.common.errors import InvalidRequest, UnsupportedMediaType

TEXT_TYPES = {".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".html"}
SUPPORTED = TEXT_TYPES | {".pdf"}
Purpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]


def extension(filename: str) -> str:
    return Path(filename).suffix.lower()


def check_upload(filename: str, purpose: str, path: Path) -> None:
    """Raise a client error for a file we could not use; the file is on disk, whole."""
    ext = extension(filename)
    if ext not in SUPPORTED:
        raise UnsupportedMediaType(
            f"unsupported file type {ext or '(none)'!r}; supported: {', '.join(sorted(SUPPORTED))}",
            param="file",
        )
    if purpose in ("fine-tune", "batch", "evals") and ext != ".jsonl":
        raise InvalidRequest(f"files for purpose {purpose!r} must be JSONL", param="file")
    if ext == ".pdf":
        with path.open("rb") as fh:
            if fh.read(5) != b"%PDF-":
                raise InvalidRequest("the file is not a PDF", param="file", code="invalid_file")
        return
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"the file is not UTF-8 text (byte {exc.start})", param="file", code="invalid_file"
        ) from None
    if ext == ".jsonl":
        check_jsonl(text)


def check_jsonl(text: str) -> None:
    """Every non-blank line one JSON object; errors name the line."""
    for number, line in jsonl.lines(text):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f"line {number}: not valid JSON ({exc.msg})", param="file", code="invalid_jsonl"
            ) from None
        if not isinstance(value, dict):
            raise InvalidRequest(
                f"line {number}: expected a JSON object", param="file", code="invalid_jsonl"
            )


def extract_text(filename: str, data: bytes) -> str:
    """The text of an accepted file (PDF: page by page)."""
    if extension(filename) == ".pdf":
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    return data.decode("utf-8-sig")

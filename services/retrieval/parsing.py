"""File types: what an upload may be, and the text a file holds.

Uploads are checked when they arrive (type by extension, then by content), so a file that is
accepted can later be parsed; parsing happens during ingestion, off the event loop, and PDF and
HTML in a worker process with time and memory caps (`parse_file`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

from services.common import jsonl
from services.common.config import scrubbed_env
from services.common.errors import InvalidRequest, UnsupportedMediaType
from services.common.rlimits import OUT_OF_MEMORY
from services.retrieval.extract import extension, extract_text

TEXT_TYPES = {".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".html"}
SUPPORTED = TEXT_TYPES | {".pdf"}
Purpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]


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


class ParseError(Exception):
    """The file could not be parsed, or its parse was stopped at a cap: the reason says which."""


# Parsed in a capped worker process; plain text is decoded here (linear, it cannot hang).
SANDBOXED = {".pdf", ".html"}


def parse_file(filename: str, path: Path, timeout_s: float, memory_mb: int) -> str:
    """The text of the file at `path`; PDF and HTML in a worker process stopped at `timeout_s`
    and `memory_mb`, so a poisoned document fails alone, with the reason."""
    ext = extension(filename)
    if ext not in SANDBOXED:
        try:
            return extract_text(filename, path.read_bytes())
        except UnicodeDecodeError as exc:
            raise ParseError(f"the file is not UTF-8 text (byte {exc.start})") from None
    if not path.exists():
        raise FileNotFoundError(path)
    argv = [sys.executable, "-m", "services.retrieval.parseworker", ext, str(path), str(memory_mb)]
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=timeout_s, env=scrubbed_env(), check=False
        )
    except subprocess.TimeoutExpired:
        raise ParseError(f"parsing took longer than {timeout_s:g} s and was stopped") from None
    if done.returncode == OUT_OF_MEMORY:
        raise ParseError(f"parsing needed more than {memory_mb} MiB and was stopped")
    if done.returncode < 0:
        raise ParseError(f"the parser crashed on this file (signal {-done.returncode})")
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip() or f"status {done.returncode}"
        raise ParseError(f"could not read the file: {reason}"[:300])
    return done.stdout.decode("utf-8", "surrogatepass")

"""/v1/files: upload (multipart), list, retrieve, content, delete; owner-scoped.

An upload is streamed to a temporary file, checked, then renamed to a server-generated name
under var/files/ and recorded; the record is written last, so a crash leaves at most an orphan
file, which startup removes (`sweep`). Deleting a file also removes its chunks everywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from services.common.errors import InvalidRequest, QuotaExceeded
from services.common.pagination import Cursor
from services.common.tenancy import Owner
from services.retrieval.catalog import Catalog, file_object, new_id
from services.retrieval.parsing import Purpose, check_upload


def clean_filename(name: str | None) -> str:
    """A display name only (never a path): its last component, printable, at most 255 chars."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    return base[:255] or "upload"


def sweep(catalog: Catalog, files_dir: Path) -> int:
    """Remove files on disk with no record (a crash between rename and insert), and temp files."""
    files_dir.mkdir(parents=True, exist_ok=True)
    removed = 0
    for path in files_dir.iterdir():
        if path.name.startswith("tmp") or catalog.file_row(path.name) is None:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


def router() -> APIRouter:
    r = APIRouter()

    @r.post("/v1/files")
    async def upload(
        request: Request, owner: Owner, file: UploadFile, purpose: Annotated[Purpose, Form()]
    ) -> dict[str, Any]:
        catalog: Catalog = request.app.state.catalog
        settings = request.app.state.settings
        files_dir: Path = settings.files_dir()
        filename = clean_filename(file.filename)
        file_id = new_id("file-")
        used = await asyncio.to_thread(catalog.owner_bytes, owner)
        quota = settings.owner_quota_bytes
        size = _size(file)
        if used + size > quota:
            raise QuotaExceeded(
                f"the files of this owner use {used:,} of {quota:,} bytes; this upload of "
                f"{size:,} bytes does not fit (delete files to make room)",
                param="file",
            )
        size, digest = await asyncio.to_thread(_store, file, filename, purpose, files_dir, file_id)
        return catalog.add_file(owner, file_id, filename, purpose, size, digest)

    @r.get("/v1/files")
    def list_files(
        request: Request,
        owner: Owner,
        purpose: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        order: Literal["asc", "desc"] = "desc",
        after: Cursor = None,
    ) -> dict[str, Any]:
        return request.app.state.catalog.list_files(owner, purpose, limit, order, after)

    @r.get("/v1/files/{file_id}")
    def retrieve(file_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        return file_object(request.app.state.catalog.file(owner, file_id))

    @r.get("/v1/files/{file_id}/content")
    def content(file_id: str, request: Request, owner: Owner) -> FileResponse:
        row = request.app.state.catalog.file(owner, file_id)
        path = request.app.state.settings.files_dir() / row.id
        return FileResponse(path, media_type="application/octet-stream", filename=row.filename)

    @r.delete("/v1/files/{file_id}")
    async def delete(file_id: str, request: Request, owner: Owner) -> dict[str, Any]:
        state = request.app.state
        catalog: Catalog = state.catalog
        catalog.file(owner, file_id)  # 404 before anything changes
        stores = catalog.memberships(owner, file_id)
        for store_id in stores:
            await state.ingestor.cancel(store_id, file_id)
        if stores:
            await asyncio.to_thread(state.index.delete, owner, stores, [file_id])
        catalog.delete_file(owner, file_id)
        (state.settings.files_dir() / file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    return r


def _store(
    upload: UploadFile, filename: str, purpose: str, files_dir: Path, file_id: str
) -> tuple[int, str]:
    """Copy the upload to disk, check it, and move it into place; (size, sha256)."""
    files_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix="tmp", dir=files_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            upload.file.seek(0)
            while block := upload.file.read(1 << 20):
                digest.update(block)
                out.write(block)
            size = out.tell()
            out.flush()
            os.fsync(out.fileno())  # the bytes on stable storage before the 200
        if size == 0:
            raise InvalidRequest("the file is empty", param="file")
        check_upload(filename, purpose, tmp)
        os.replace(tmp, files_dir / file_id)
        _fsync_dir(files_dir)  # and the name it was given
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def _size(upload: UploadFile) -> int:
    """The upload's size in bytes (spooled by the multipart parser before the route runs)."""
    if upload.size is not None:
        return upload.size
    upload.file.seek(0, os.SEEK_END)
    return upload.file.tell()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""`crucible backup` / `crucible restore`: a whole deployment's data in one directory.

    backup/
      manifest.json          what is inside: each schema's revision, row counts, source paths
      sql/<schema>/<table>.jsonl   every row, one JSON object a line (a logical dump)
      files/                 retrieval's uploaded files
      adapters/              fine-tuned adapters

The SQL part is logical, read through the same models and migrations the services use, so a
backup of SQLite restores into PostgreSQL and back. A restore builds each schema at the revision
the backup was taken at, loads the rows, then upgrades to the newest. Milvus is not copied: its
contents are derived from the files, so a restore marks every ingested file of every store for
ingestion, and the retrieval service re-indexes them when it starts (their status reads
`in_progress` until then). Each schema is read in one transaction; for a backup consistent
across schemas, take it with the services stopped.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, DateTime, Engine, Integer, LargeBinary, Table, func, select, text

from services.common import migrations
from services.common.db import make_engine

FORMAT = 1
BATCH = 1000


@dataclass(frozen=True)
class Deployment:
    """Where a deployment keeps its data (from the services' own settings)."""

    databases: dict[str, str]  # schema -> SQLAlchemy URL
    files_dir: Path
    adapters_dir: Path

    @classmethod
    def from_settings(cls) -> Deployment:
        from services.agent.config import AgentSettings
        from services.finetune.config import FinetuneSettings
        from services.gateway.config import GatewaySettings
        from services.retrieval.config import RetrievalSettings

        retrieval, finetune = RetrievalSettings(), FinetuneSettings()
        return cls(
            databases={
                "gateway": GatewaySettings().db_url(),
                "retrieval": retrieval.db_url(),
                "finetune": finetune.db_url(),
                "agent": AgentSettings().db_url(),
            },
            files_dir=retrieval.files_dir(),
            adapters_dir=finetune.adapters(),
        )


class BackupError(Exception):
    pass


def backup(dep: Deployment, out: Path) -> dict[str, Any]:
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty")
    (out / "sql").mkdir(parents=True)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created_at": int(time.time()),
        "schemas": {},
        "adapters_dir": str(dep.adapters_dir.resolve()),
    }
    for schema, url in dep.databases.items():
        engine = make_engine(url)
        try:
            manifest["schemas"][schema] = _dump(engine, schema, out / "sql" / schema)
        finally:
            engine.dispose()
    for name, source in (("files", dep.files_dir), ("adapters", dep.adapters_dir)):
        if source.is_dir():
            shutil.copytree(source, out / name, ignore=shutil.ignore_patterns("tmp*"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _dump(engine: Engine, schema: str, folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True)
    rows: dict[str, int] = {}
    with engine.connect() as conn:
        if engine.url.get_backend_name() == "postgresql":
            conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        revision = migrations.current_on(conn, schema)
        if revision is None:
            raise BackupError(f"the {schema} database has no schema yet")
        for table in migrations.metadata(schema).sorted_tables:
            with open(folder / f"{table.name}.jsonl", "w") as f:
                rows[table.name] = 0
                for row in conn.execute(select(table)).mappings():
                    f.write(json.dumps({k: _encode(v) for k, v in row.items()}) + "\n")
                    rows[table.name] += 1
    return {"revision": revision, "rows": rows}


def restore(dep: Deployment, source: Path) -> dict[str, Any]:
    manifest = json.loads((source / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{source} is not a Crucible backup of format {FORMAT}")
    engines = {schema: make_engine(url) for schema, url in dep.databases.items()}
    try:
        for schema, engine in engines.items():
            _refuse_if_not_empty(engine, schema)
        for name, target in (("files", dep.files_dir), ("adapters", dep.adapters_dir)):
            if (source / name).is_dir():
                if target.is_dir() and any(target.iterdir()):
                    raise BackupError(f"{target} is not empty: restore into an empty deployment")
                shutil.copytree(source / name, target, dirs_exist_ok=True)
        for schema, engine in engines.items():
            info = manifest["schemas"][schema]
            migrations.upgrade(engine, schema, info["revision"])
            with engine.begin() as conn:
                for table in migrations.metadata(schema).sorted_tables:
                    _load(conn, table, source / "sql" / schema / f"{table.name}.jsonl")
                _after_load(conn, schema, manifest, dep)
            migrations.upgrade(engine, schema)
    finally:
        for engine in engines.values():
            engine.dispose()
    return manifest


def _refuse_if_not_empty(engine: Engine, schema: str) -> None:
    with engine.connect() as conn:
        if migrations.current_on(conn, schema) is None:
            return
        for table in migrations.metadata(schema).sorted_tables:
            if conn.execute(select(func.count()).select_from(table)).scalar():
                raise BackupError(
                    f"the {schema} database already holds data ({table.name}): "
                    "restore into an empty deployment"
                )


def _load(conn: Connection, table: Table, path: Path) -> None:
    if not path.exists():
        return  # a table newer than the backup's revision: nothing to load
    batch: list[dict[str, Any]] = []
    for line in _lines(path):
        raw = json.loads(line)
        batch.append({c.name: _decode(raw.get(c.name), c.type) for c in table.columns})
        if len(batch) >= BATCH:
            conn.execute(table.insert(), batch)
            batch = []
    if batch:
        conn.execute(table.insert(), batch)
    _advance_sequence(conn, table)


def _lines(path: Path) -> Iterator[str]:
    with open(path) as f:
        yield from (line for line in f if line.strip())


def _advance_sequence(conn: Connection, table: Table) -> None:
    """Rows came with their ids: PostgreSQL's sequence must start past them."""
    if conn.engine.url.get_backend_name() != "postgresql":
        return
    for col in table.primary_key.columns:
        if isinstance(col.type, Integer) and col.autoincrement in (True, "auto"):
            top = select(func.coalesce(func.max(col), 0)).scalar_subquery()
            sequence = func.pg_get_serial_sequence(table.name, col.name)
            conn.execute(select(func.setval(sequence, top + 1, False)))


def _after_load(conn: Connection, schema: str, manifest: dict[str, Any], dep: Deployment) -> None:
    if schema == "retrieval":
        # Milvus is derived data: everything ingested is ingested again from the files.
        conn.execute(
            text("UPDATE vector_store_files SET status = 'in_progress' WHERE status = 'completed'")
        )
    elif schema == "finetune":
        # Adapters now live under this deployment's adapters directory.
        old, new = manifest["adapters_dir"].rstrip("/") + "/", str(dep.adapters_dir.resolve())
        moved = (
            "UPDATE adapters SET path = :new || substr(path, :n) WHERE substr(path, 1, :m) = :old"
        )
        conn.execute(text(moved), {"new": new + "/", "n": len(old) + 1, "m": len(old), "old": old})


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def _decode(value: Any, type_: Any) -> Any:
    if value is None:
        return None
    if isinstance(type_, DateTime):
        return datetime.fromisoformat(value)
    if isinstance(type_, LargeBinary):
        return base64.b64decode(value)
    return value

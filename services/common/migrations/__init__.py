"""Schema migrations (Alembic) for each service's database, run at start and by `crucible db`.

Each service owns one schema: its tables and a version table of its own
(`crucible_version_<schema>`), so compose can keep all four in one PostgreSQL database. The
revisions live beside the service (`services/<schema>/migrations/`); this package holds what they
share: the Alembic environment and the template `crucible db revision` writes new ones from.

Every service and the fine-tuning worker call `upgrade` when they open their database. It is
safe to race: one process migrates while the others wait (an advisory lock on PostgreSQL, a
file lock beside a SQLite file), then finds nothing to do.
"""

from __future__ import annotations

import fcntl
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, inspect, text

SERVICES = Path(__file__).resolve().parents[2]

# Schema name → the module whose `Base.metadata` the head revision must match.
SCHEMAS = {
    "gateway": "services.gateway.keys",
    "retrieval": "services.retrieval.catalog",
    "finetune": "services.finetune.tables",
    "agent": "services.agent.runs",
}


def version_table(schema: str) -> str:
    return f"crucible_version_{schema}"


def metadata(schema: str) -> MetaData:
    module = importlib.import_module(SCHEMAS[schema])
    meta: MetaData = module.Base.metadata
    return meta


def config(schema: str, connection: Connection | None = None) -> Config:
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r} (one of {', '.join(SCHEMAS)})")
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.set_main_option("version_locations", str(SERVICES / schema / "migrations"))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["schema"] = schema
    cfg.attributes["connection"] = connection
    return cfg


def head(schema: str) -> str:
    rev = ScriptDirectory.from_config(config(schema)).get_current_head()
    assert rev is not None
    return rev


def current(engine: Engine, schema: str) -> str | None:
    """The revision the database is at; None for a database no migration has touched."""
    with engine.connect() as conn:
        return current_on(conn, schema)


def current_on(conn: Connection, schema: str) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table": version_table(schema)})
    return ctx.get_current_revision()


def upgrade(engine: Engine, schema: str, revision: str = "head") -> None:
    """Bring the database to `revision`; a database made before migrations existed is adopted."""
    with _exclusive(engine, schema) as conn:
        cfg = config(schema, conn)
        _adopt(conn, cfg, schema)
        command.upgrade(cfg, revision)


def _adopt(conn: Connection, cfg: Config, schema: str) -> None:
    """Release 52bf93e and earlier made their tables with `create_all` and kept no version: such
    a database is at the first revision, which is that schema (later columns are added by
    revisions that check for them)."""
    if current_on(conn, schema) is not None:
        return
    existing = set(inspect(conn).get_table_names())
    if existing & set(metadata(schema).tables):
        first = ScriptDirectory.from_config(cfg).get_base()
        assert first is not None
        command.stamp(cfg, first)


def downgrade(engine: Engine, schema: str, revision: str) -> None:
    with _exclusive(engine, schema) as conn:
        command.downgrade(config(schema, conn), revision)


def revision(schema: str, message: str) -> str:
    """Write the next revision, its operations drawn from what the models have that a database
    at head lacks (review it before committing: Alembic cannot see renames)."""
    from sqlalchemy import create_engine

    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        cfg = config(schema, conn)
        command.upgrade(cfg, "head")
        script = ScriptDirectory.from_config(cfg)
        number = len(list(script.walk_revisions())) + 1
        made = command.revision(cfg, message, autogenerate=True, rev_id=f"{schema}_{number:04d}")
    engine.dispose()
    assert made is not None and not isinstance(made, list)
    return made.path


@contextmanager
def _exclusive(engine: Engine, schema: str) -> Iterator[Connection]:
    """A connection in a transaction that only one process at a time holds for this schema."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.begin() as conn:
            # Released at commit; PostgreSQL's DDL is transactional, so a failed upgrade undoes all.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": schema})
            yield conn
        return
    path = url.database
    if not path or path == ":memory:":
        with engine.begin() as conn:
            yield conn
        return
    with open(f"{path}.migrate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

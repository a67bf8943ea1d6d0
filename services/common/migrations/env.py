"""The Alembic environment every schema shares: run on the connection `upgrade` opened."""

from __future__ import annotations

from alembic import context

from services.common.migrations import metadata, version_table

cfg = context.config
schema: str = cfg.attributes["schema"]
connection = cfg.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `crucible db` or services.common.migrations")
context.configure(
    connection=connection,
    target_metadata=metadata(schema),
    version_table=version_table(schema),
    # Only this schema's tables: compose keeps every service's schema in one database.
    include_name=lambda name, type_, _parent: type_ != "table" or name in metadata(schema).tables,
    render_as_batch=True,  # SQLite alters a table by copying it
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

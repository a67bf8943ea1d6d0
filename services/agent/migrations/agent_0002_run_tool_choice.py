"""A run's tool_choice ("auto" or "required").

Commit 41cb9f6 added the column to the model without a migration: databases made before it lack
it, those made after have it. Both are adopted at agent_0001, so this adds it only where missing.

Revision ID: agent_0002
Revises: agent_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "agent_0002"
down_revision = "agent_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("agent_runs")}
    if "tool_choice" not in columns:
        with op.batch_alter_table("agent_runs") as batch_op:
            batch_op.add_column(
                sa.Column("tool_choice", sa.String(16), nullable=False, server_default="auto")
            )


def downgrade() -> None:
    with op.batch_alter_table("agent_runs") as batch_op:
        batch_op.drop_column("tool_choice")

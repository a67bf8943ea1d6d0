"""run usage: an agent or eval run's model calls, tool calls and tool seconds

Revision ID: finetune_0009
Revises: finetune_0008
Create Date: 2026-12-01 18:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "finetune_0009"
down_revision = "finetune_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requests", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(
            sa.Column("tool_calls", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("tool_seconds", sa.Float(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_column("tool_seconds")
        batch_op.drop_column("tool_calls")
        batch_op.drop_column("requests")

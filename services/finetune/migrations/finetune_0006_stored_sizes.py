"""stored completions and responses record their size (what the owner's stored-data quota counts)

Revision ID: finetune_0006
Revises: finetune_0005
Create Date: 2026-12-01 11:05:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "finetune_0006"
down_revision = "finetune_0005"
branch_labels = None
depends_on = None

TABLES = ("stored_completions", "stored_responses")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("stored_bytes", sa.Integer(), nullable=False, server_default="0")
            )
        # Rows stored before: their JSON's length, about what the gateway sent.
        t = sa.table(table, sa.column("stored_bytes"), sa.column("request"), sa.column("response"))
        length = sa.func.length
        op.execute(
            t.update().values(
                stored_bytes=length(sa.cast(t.c.request, sa.Text))
                + length(sa.cast(t.c.response, sa.Text))
            )
        )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("stored_bytes")

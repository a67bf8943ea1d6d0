"""usage records

Revision ID: finetune_0007
Revises: finetune_0006
Create Date: 2026-12-01 15:11:30.526999
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "finetune_0007"
down_revision = "finetune_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("input_cached_tokens", sa.Integer(), nullable=False),
        sa.Column("engine_seconds", sa.Float(), nullable=False),
        sa.Column("usage_bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.create_index("ix_usage_records_kind_at", ["kind", "at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_usage_records_project_id"), ["project_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_records_project_id"))
        batch_op.drop_index("ix_usage_records_kind_at")

    op.drop_table("usage_records")

"""job training seconds

Revision ID: finetune_0008
Revises: finetune_0007
Create Date: 2026-12-01 16:06:12.602439
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "finetune_0008"
down_revision = "finetune_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("train_seconds", sa.Float(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.drop_column("train_seconds")

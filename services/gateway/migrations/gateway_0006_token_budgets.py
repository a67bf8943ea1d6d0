"""token budgets

Revision ID: gateway_0006
Revises: gateway_0005
Create Date: 2026-12-01 14:34:13.312430
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "gateway_0006"
down_revision = "gateway_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("budget_tokens", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("budget_period", sa.String(length=8), server_default="month", nullable=False)
        )

    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("budget_tokens", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("budget_period", sa.String(length=8), server_default="month", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("budget_period")
        batch_op.drop_column("budget_tokens")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("budget_period")
        batch_op.drop_column("budget_tokens")

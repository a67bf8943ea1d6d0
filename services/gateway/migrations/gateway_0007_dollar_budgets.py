"""dollar budgets

Revision ID: gateway_0007
Revises: gateway_0006
Create Date: 2026-12-02 05:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "gateway_0007"
down_revision = "gateway_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("api_keys", "projects"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("budget_usd_micros", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    for table in ("projects", "api_keys"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("budget_usd_micros")

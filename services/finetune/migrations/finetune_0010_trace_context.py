"""trace context: the traceparent of the request that made a fine-tuning job or an eval run, and
a stored completion's trace id

Revision ID: finetune_0010
Revises: finetune_0009
Create Date: 2026-12-01 19:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "finetune_0010"
down_revision = "finetune_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("fine_tuning_jobs", "eval_runs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("traceparent", sa.String(55), nullable=True))
    with op.batch_alter_table("stored_completions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trace_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stored_completions", schema=None) as batch_op:
        batch_op.drop_column("trace_id")
    for table in ("eval_runs", "fine_tuning_jobs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("traceparent")

"""evals, runs and output items

Revision ID: finetune_0003
Revises: finetune_0002
Create Date: 2026-12-01 00:48:40.762788
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "finetune_0003"
down_revision = "finetune_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "evals",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("data_source_config", sa.JSON(), nullable=False),
        sa.Column("testing_criteria", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("evals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evals_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_evals_owner"), ["owner"], unique=False)

    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("eval_id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("data_source", sa.JSON(), nullable=False),
        sa.Column("items", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("usage", sa.JSON(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["eval_id"],
            ["evals.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("eval_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_eval_runs_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_eval_runs_eval_id"), ["eval_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_eval_runs_owner"), ["owner"], unique=False)
        batch_op.create_index(batch_op.f("ix_eval_runs_status"), ["status"], unique=False)

    op.create_table(
        "eval_output_items",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("eval_id", sa.String(length=40), nullable=False),
        sa.Column("item_index", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("item", sa.JSON(), nullable=False),
        sa.Column("sample", sa.JSON(), nullable=True),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["eval_runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "item_index"),
    )
    with op.batch_alter_table("eval_output_items", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_eval_output_items_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_eval_output_items_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_eval_output_items_status"), ["status"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("eval_output_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_eval_output_items_status"))
        batch_op.drop_index(batch_op.f("ix_eval_output_items_run_id"))
        batch_op.drop_index(batch_op.f("ix_eval_output_items_created_at"))

    op.drop_table("eval_output_items")
    with op.batch_alter_table("eval_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_eval_runs_status"))
        batch_op.drop_index(batch_op.f("ix_eval_runs_owner"))
        batch_op.drop_index(batch_op.f("ix_eval_runs_eval_id"))
        batch_op.drop_index(batch_op.f("ix_eval_runs_created_at"))

    op.drop_table("eval_runs")
    with op.batch_alter_table("evals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evals_owner"))
        batch_op.drop_index(batch_op.f("ix_evals_created_at"))

    op.drop_table("evals")

"""stored completions, feedback and datasets

Revision ID: finetune_0002
Revises: finetune_0001
Create Date: 2026-12-01 00:41:30.710725
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "finetune_0002"
down_revision = "finetune_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "fine_tuning_datasets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("training_file", sa.String(length=40), nullable=False),
        sa.Column("validation_file", sa.String(length=40), nullable=True),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("completion_ids", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("fine_tuning_datasets", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_fine_tuning_datasets_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_fine_tuning_datasets_owner"), ["owner"], unique=False)

    op.create_table(
        "stored_completions",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("request_id", sa.String(length=200), nullable=True),
        sa.Column("prompt_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("stored_completions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_stored_completions_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_stored_completions_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_stored_completions_model"), ["model"], unique=False)
        batch_op.create_index(batch_op.f("ix_stored_completions_owner"), ["owner"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_stored_completions_prompt_hash"), ["prompt_hash"], unique=False
        )

    op.create_table(
        "completion_feedback",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("completion_id", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("value_text", sa.String(length=512), nullable=False),
        sa.Column("comment", sa.String(length=4096), nullable=True),
        sa.Column("correction", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["completion_id"], ["stored_completions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("completion_id", "metric", "key_id"),
    )
    with op.batch_alter_table("completion_feedback", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_completion_feedback_completion_id"), ["completion_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_completion_feedback_owner"), ["owner"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("completion_feedback", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_completion_feedback_owner"))
        batch_op.drop_index(batch_op.f("ix_completion_feedback_completion_id"))

    op.drop_table("completion_feedback")
    with op.batch_alter_table("stored_completions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stored_completions_prompt_hash"))
        batch_op.drop_index(batch_op.f("ix_stored_completions_owner"))
        batch_op.drop_index(batch_op.f("ix_stored_completions_model"))
        batch_op.drop_index(batch_op.f("ix_stored_completions_expires_at"))
        batch_op.drop_index(batch_op.f("ix_stored_completions_created_at"))

    op.drop_table("stored_completions")
    with op.batch_alter_table("fine_tuning_datasets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fine_tuning_datasets_owner"))
        batch_op.drop_index(batch_op.f("ix_fine_tuning_datasets_created_at"))

    op.drop_table("fine_tuning_datasets")

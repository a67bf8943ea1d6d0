"""stored responses

Revision ID: finetune_0004
Revises: finetune_0003
Create Date: 2026-12-01 01:14:47.345943
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "finetune_0004"
down_revision = "finetune_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "stored_responses",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column("own_input_from", sa.Integer(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("previous_response_id", sa.String(length=200), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("stored_responses", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_stored_responses_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_stored_responses_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_stored_responses_model"), ["model"], unique=False)
        batch_op.create_index(batch_op.f("ix_stored_responses_owner"), ["owner"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("stored_responses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stored_responses_owner"))
        batch_op.drop_index(batch_op.f("ix_stored_responses_model"))
        batch_op.drop_index(batch_op.f("ix_stored_responses_expires_at"))
        batch_op.drop_index(batch_op.f("ix_stored_responses_created_at"))

    op.drop_table("stored_responses")

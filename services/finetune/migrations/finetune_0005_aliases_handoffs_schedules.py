"""model aliases and their revisions, fine-tuning hand-offs and schedules

Revision ID: finetune_0005
Revises: finetune_0004
Create Date: 2026-12-01 04:10:32.452423
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "finetune_0005"
down_revision = "finetune_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fine_tuning_handoffs",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("data_source", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=True),
        sa.Column("detail", sa.String(length=2000), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    with op.batch_alter_table("fine_tuning_handoffs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fine_tuning_handoffs_owner"), ["owner"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_fine_tuning_handoffs_status"), ["status"], unique=False
        )

    op.create_table(
        "fine_tuning_schedule_runs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("schedule_id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("trigger", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=True),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("fine_tuning_schedule_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_fine_tuning_schedule_runs_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_fine_tuning_schedule_runs_schedule_id"), ["schedule_id"], unique=False
        )

    op.create_table(
        "fine_tuning_schedules",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("cron", sa.String(length=128), nullable=False),
        sa.Column("dataset", sa.JSON(), nullable=False),
        sa.Column("window_days", sa.Integer(), nullable=True),
        sa.Column("job", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("fine_tuning_schedules", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_fine_tuning_schedules_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_fine_tuning_schedules_next_run_at"), ["next_run_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_fine_tuning_schedules_owner"), ["owner"], unique=False)

    op.create_table(
        "model_alias_stats",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("alias_id", sa.String(length=40), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=256), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("unavailable", sa.Integer(), nullable=False),
        sa.Column("buckets", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("model_alias_stats", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_alias_stats_alias_id"), ["alias_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_model_alias_stats_at"), ["at"], unique=False)

    op.create_table(
        "model_aliases",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("owner", "name"),
    )
    with op.batch_alter_table("model_aliases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_aliases_owner"), ["owner"], unique=False)

    op.create_table(
        "model_alias_revisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("alias_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=True),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("restored", sa.Integer(), nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["alias_id"], ["model_aliases.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("alias_id", "number"),
    )
    with op.batch_alter_table("model_alias_revisions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_alias_revisions_alias_id"), ["alias_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("model_alias_revisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_alias_revisions_alias_id"))

    op.drop_table("model_alias_revisions")
    with op.batch_alter_table("model_aliases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_aliases_owner"))

    op.drop_table("model_aliases")
    with op.batch_alter_table("model_alias_stats", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_alias_stats_at"))
        batch_op.drop_index(batch_op.f("ix_model_alias_stats_alias_id"))

    op.drop_table("model_alias_stats")
    with op.batch_alter_table("fine_tuning_schedules", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fine_tuning_schedules_owner"))
        batch_op.drop_index(batch_op.f("ix_fine_tuning_schedules_next_run_at"))
        batch_op.drop_index(batch_op.f("ix_fine_tuning_schedules_created_at"))

    op.drop_table("fine_tuning_schedules")
    with op.batch_alter_table("fine_tuning_schedule_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fine_tuning_schedule_runs_schedule_id"))
        batch_op.drop_index(batch_op.f("ix_fine_tuning_schedule_runs_created_at"))

    op.drop_table("fine_tuning_schedule_runs")
    with op.batch_alter_table("fine_tuning_handoffs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fine_tuning_handoffs_status"))
        batch_op.drop_index(batch_op.f("ix_fine_tuning_handoffs_owner"))

    op.drop_table("fine_tuning_handoffs")

"""runs by end time: the finetune service reads the runs that ended since its last round

Revision ID: agent_0003
Revises: agent_0002
"""

from __future__ import annotations

from alembic import op

revision = "agent_0003"
down_revision = "agent_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agent_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_agent_runs_completed_at"), ["completed_at"])


def downgrade() -> None:
    with op.batch_alter_table("agent_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agent_runs_completed_at"))

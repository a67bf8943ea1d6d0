"""ingestion tries per store file

Revision ID: retrieval_0002
Revises: retrieval_0001
Create Date: 2026-12-01 06:34:17.480625
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "retrieval_0002"
down_revision = "retrieval_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vector_store_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tries", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("vector_store_files", schema=None) as batch_op:
        batch_op.drop_column("tries")

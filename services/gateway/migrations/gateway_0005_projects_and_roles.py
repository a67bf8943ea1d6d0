"""projects and roles: each owner of the keys becomes a project of the same id (so nothing the
services keep under that owner moves); admin keys get role "admin", the others "member".

Revision ID: gateway_0005
Revises: gateway_0004
Create Date: 2026-12-01 14:15:18.007745
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "gateway_0005"
down_revision = "gateway_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(
        "INSERT INTO projects (id, name, created_at)"
        " SELECT owner, owner, MIN(created_at) FROM api_keys GROUP BY owner"
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("role", sa.String(length=16), server_default="member", nullable=False)
        )
        batch_op.add_column(
            sa.Column("service_account", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.execute("UPDATE api_keys SET role = 'admin' WHERE is_admin")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("is_admin")


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.execute("UPDATE api_keys SET is_admin = (role = 'admin')")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("service_account")
        batch_op.drop_column("role")
    op.drop_table("projects")

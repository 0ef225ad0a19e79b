"""Curated splits: a frozen test split per project, and the audit log of curators' split changes.

- ``project.test_frozen`` (false for existing projects: their splits stay as the hash made them).
- table ``split_change``: who moved which subject or image between splits, and when a test split
  was frozen.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.db.base

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SPLITS = "('train', 'val', 'test')"


def upgrade() -> None:
    # Plain ALTER TABLE, not batch mode: on SQLite a batch add_column with a SQL default recreates the
    # table, and dropping ``project`` with foreign keys on (sonoseg's connections) cascades to every
    # image, mask and run. SQLite (>= 3.23 for the FALSE keyword) and PostgreSQL both add the column
    # in place.
    op.add_column("project", sa.Column("test_frozen", sa.Boolean(), server_default=sa.text("false"), nullable=False))

    op.create_table(
        "split_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=True),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("from_split", sa.String(length=8), nullable=True),
        sa.Column("to_split", sa.String(length=8), nullable=True),
        sa.Column("images", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("forced", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("author", sa.String(length=200), nullable=False),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('move', 'freeze')", name=op.f("ck_split_change_kind")),
        sa.CheckConstraint(f"from_split IS NULL OR from_split IN {_SPLITS}", name=op.f("ck_split_change_from_split")),
        sa.CheckConstraint(f"to_split IS NULL OR to_split IN {_SPLITS}", name=op.f("ck_split_change_to_split")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["image.id"], name=op.f("fk_split_change_image_id_image"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_split_change_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_split_change")),
    )
    op.create_index(op.f("ix_split_change_project_id"), "split_change", ["project_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_split_change_project_id"), table_name="split_change")
    op.drop_table("split_change")
    op.drop_column("project", "test_frozen")  # in place on both (SQLite >= 3.35), for the same reason

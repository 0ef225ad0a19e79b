"""Retraining loop: a per-project switch for automatic retraining, and on training runs the
debounce deadline (``not_before``), the outbox timestamp (``dispatched_at``) and the attempt count.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.db.base

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.add_column(sa.Column("auto_retrain", sa.Boolean(), server_default=sa.text("true"), nullable=False))

    with op.batch_alter_table("training_run", schema=None) as batch_op:
        batch_op.add_column(sa.Column("not_before", backend.db.base.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("dispatched_at", backend.db.base.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("training_run", schema=None) as batch_op:
        batch_op.drop_column("attempts")
        batch_op.drop_column("dispatched_at")
        batch_op.drop_column("not_before")

    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_column("auto_retrain")

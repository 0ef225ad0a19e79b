"""Active learning: cached per-version image scores, label leases, the project's strategy, lead time.

- table ``image_score``: what a model version thought of an image (entropy, flip-TTA disagreement,
  boundary uncertainty, foreground fraction, a float16 embedding), one row per (image, version);
- table ``label_lease``: an image handed out to one annotator until it expires (unique per image);
- ``project.al_strategy`` ('default' for existing projects);
- ``mask_version.lead_time_seconds``: Label Studio's ``lead_time`` of an annotation (NULL for
  existing rows: it was not stored before).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-15 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import backend.db.base

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ALTER TABLE (not batch mode), as in 0004: a batch ALTER of ``project`` recreates the table on
    # SQLite, and dropping it with foreign keys on cascades to every image.
    op.add_column(
        "project", sa.Column("al_strategy", sa.String(length=32), server_default=sa.text("'default'"), nullable=False)
    )
    op.add_column("mask_version", sa.Column("lead_time_seconds", sa.Float(), nullable=True))

    op.create_table(
        "image_score",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("entropy", sa.Float(), nullable=False),
        sa.Column("tta_disagreement", sa.Float(), nullable=False),
        sa.Column("boundary_uncertainty", sa.Float(), nullable=False),
        sa.Column("foreground_fraction", sa.Float(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("embedding_dim", sa.Integer(), nullable=False),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("embedding_dim >= 0", name=op.f("ck_image_score_embedding_dim")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["image.id"], name=op.f("fk_image_score_image_id_image"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_image_score_model_version_id_model_version"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_score")),
        sa.UniqueConstraint("image_id", "model_version_id", name=op.f("uq_image_score_image_id_model_version_id")),
    )
    op.create_index(op.f("ix_image_score_model_version_id"), "image_score", ["model_version_id"], unique=False)

    op.create_table(
        "label_lease",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("annotator", sa.String(length=200), nullable=False),
        sa.Column("leased_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("expires_at > leased_at", name=op.f("ck_label_lease_expiry")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["image.id"], name=op.f("fk_label_lease_image_id_image"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_label_lease_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_label_lease")),
        sa.UniqueConstraint("image_id", name=op.f("uq_label_lease_image_id")),
    )
    op.create_index("ix_label_lease_project_id_expires_at", "label_lease", ["project_id", "expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_label_lease_project_id_expires_at", table_name="label_lease")
    op.drop_table("label_lease")
    op.drop_index(op.f("ix_image_score_model_version_id"), table_name="image_score")
    op.drop_table("image_score")
    # In place on both (SQLite >= 3.35), for the same reason as the upgrade.
    op.drop_column("mask_version", "lead_time_seconds")
    op.drop_column("project", "al_strategy")

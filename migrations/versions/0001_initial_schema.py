"""Initial schema: projects, images and their sources, mask versions, model versions and their
serving history, predictions, training runs and webhook events (backend/db/models.py explains
the rules each table enforces).

Revision ID: 0001
Revises:
Create Date: 2026-11-25 17:21:58.321204
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import backend.db.base

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "project",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("ls_project_id", sa.Integer(), nullable=True),
        sa.Column("label_config", sa.Text(), nullable=True),
        sa.Column(
            "class_names", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("retrain_after", sa.Integer(), nullable=True),
        sa.Column("train_max_minutes", sa.Float(), nullable=True),
        sa.Column("retrain_pending", sa.Boolean(), server_default=sa.text("(false)"), nullable=False),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_project")),
        sa.UniqueConstraint("ls_project_id", name=op.f("uq_project_ls_project_id")),
    )
    op.create_table(
        "webhook_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_key", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("ls_project_id", sa.Integer(), nullable=True),
        sa.Column(
            "payload", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("received_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("processed_at", backend.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'processed', 'ignored', 'failed')", name=op.f("ck_webhook_event_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_event")),
        sa.UniqueConstraint("event_key", name=op.f("uq_webhook_event_event_key")),
    )
    with op.batch_alter_table("webhook_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_event_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_webhook_event_status"), ["status"], unique=False)

    op.create_table(
        "image",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("blob_key", sa.String(length=200), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False),
        sa.Column("source_format", sa.String(length=16), nullable=False),
        sa.Column("frame_index", sa.Integer(), nullable=False),
        sa.Column(
            "acquisition", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("split IN ('train', 'val', 'test')", name=op.f("ck_image_split")),
        sa.CheckConstraint("width > 0 AND height > 0", name=op.f("ck_image_size")),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_image_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image")),
        sa.UniqueConstraint("project_id", "sha256", name=op.f("uq_image_project_id_sha256")),
    )
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_image_project_id"), ["project_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_image_subject"), ["subject"], unique=False)

    op.create_table(
        "model_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(length=64), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("arch", sa.String(length=64), nullable=True),
        sa.Column(
            "metrics", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("checkpoint_key", sa.String(length=200), nullable=True),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True),
        sa.Column("gate_reason", sa.Text(), nullable=True),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", backend.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('training', 'candidate', 'serving', 'retired', 'failed')", name=op.f("ck_model_version_status")
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["model_version.id"],
            name=op.f("fk_model_version_parent_id_model_version"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_model_version_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_version")),
        sa.UniqueConstraint("uid", name=op.f("uq_model_version_uid")),
    )
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_version_project_id"), ["project_id"], unique=False)
        batch_op.create_index(
            "uq_model_version_one_serving",
            ["project_id"],
            unique=True,
            sqlite_where=sa.text("status = 'serving'"),
            postgresql_where=sa.text("status = 'serving'"),
        )

    op.create_table(
        "image_source",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("ls_task_id", sa.Integer(), nullable=True),
        sa.Column("uri", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.text("(true)"), nullable=False),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('labelstudio', 'import')", name=op.f("ck_image_source_kind")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["image.id"], name=op.f("fk_image_source_image_id_image"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_image_source_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_source")),
        sa.UniqueConstraint("project_id", "ls_task_id", name=op.f("uq_image_source_project_id_ls_task_id")),
    )
    with op.batch_alter_table("image_source", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_image_source_image_id"), ["image_id"], unique=False)

    op.create_table(
        "mask_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("ls_annotation_id", sa.Integer(), nullable=True),
        sa.Column("author", sa.String(length=200), nullable=True),
        sa.Column("blob_key", sa.String(length=200), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("foreground_pixels", sa.Integer(), nullable=False),
        sa.Column("is_current", sa.Boolean(), server_default=sa.text("(false)"), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("(true)"), nullable=False),
        sa.Column("webhook_event_id", sa.Integer(), nullable=True),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "NOT (is_current AND source = 'prediction')", name=op.f("ck_mask_version_prediction_not_current")
        ),
        sa.CheckConstraint("source IN ('annotation', 'prediction', 'import')", name=op.f("ck_mask_version_source")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["image.id"], name=op.f("fk_mask_version_image_id_image"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["webhook_event_id"],
            ["webhook_event.id"],
            name=op.f("fk_mask_version_webhook_event_id_webhook_event"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mask_version")),
        sa.UniqueConstraint("image_id", "version", name=op.f("uq_mask_version_image_id_version")),
    )
    with op.batch_alter_table("mask_version", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_mask_version_image_id"), ["image_id"], unique=False)
        batch_op.create_index("ix_mask_version_ls_annotation_id", ["ls_annotation_id"], unique=False)
        batch_op.create_index(
            "uq_mask_version_one_current",
            ["image_id"],
            unique=True,
            sqlite_where=sa.text("is_current"),
            postgresql_where=sa.text("is_current"),
        )

    op.create_table(
        "serving_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("previous_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('promote', 'rollback')", name=op.f("ck_serving_change_kind")),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_serving_change_model_version_id_model_version"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["previous_id"],
            ["model_version.id"],
            name=op.f("fk_serving_change_previous_id_model_version"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_serving_change_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_serving_change")),
    )
    with op.batch_alter_table("serving_change", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_serving_change_project_id"), ["project_id"], unique=False)

    op.create_table(
        "training_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column(
            "progress", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False
        ),
        sa.Column("from_scratch", sa.Boolean(), server_default=sa.text("(false)"), nullable=False),
        sa.Column("celery_task_id", sa.String(length=64), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", backend.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", backend.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", backend.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f("ck_training_run_status")
        ),
        sa.CheckConstraint(
            "trigger IN ('annotations', 'schedule', 'manual', 'start_training')", name=op.f("ck_training_run_trigger")
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_training_run_model_version_id_model_version"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_training_run_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_run")),
    )
    with op.batch_alter_table("training_run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_run_project_id"), ["project_id"], unique=False)
        batch_op.create_index(
            "uq_training_run_one_active",
            ["project_id"],
            unique=True,
            sqlite_where=sa.text("status IN ('queued', 'running')"),
            postgresql_where=sa.text("status IN ('queued', 'running')"),
        )

    op.create_table(
        "model_version_mask",
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("mask_version_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["mask_version_id"],
            ["mask_version.id"],
            name=op.f("fk_model_version_mask_mask_version_id_mask_version"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_model_version_mask_model_version_id_model_version"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_version_id", "mask_version_id", name=op.f("pk_model_version_mask")),
    )
    op.create_table(
        "prediction",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("model_version_uid", sa.String(length=64), nullable=False),
        sa.Column("ls_task_id", sa.Integer(), nullable=True),
        sa.Column("mask_version_id", sa.Integer(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("uncertainty", sa.Float(), nullable=True),
        sa.Column("corrected_mask_version_id", sa.Integer(), nullable=True),
        sa.Column("correction_dice", sa.Float(), nullable=True),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["corrected_mask_version_id"],
            ["mask_version.id"],
            name=op.f("fk_prediction_corrected_mask_version_id_mask_version"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["image.id"], name=op.f("fk_prediction_image_id_image"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["mask_version_id"],
            ["mask_version.id"],
            name=op.f("fk_prediction_mask_version_id_mask_version"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_prediction_model_version_id_model_version"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prediction")),
    )
    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_prediction_image_id"), ["image_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_prediction_ls_task_id"), ["ls_task_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_prediction_ls_task_id"))
        batch_op.drop_index(batch_op.f("ix_prediction_image_id"))

    op.drop_table("prediction")
    op.drop_table("model_version_mask")
    with op.batch_alter_table("training_run", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_training_run_one_active",
            sqlite_where=sa.text("status IN ('queued', 'running')"),
            postgresql_where=sa.text("status IN ('queued', 'running')"),
        )
        batch_op.drop_index(batch_op.f("ix_training_run_project_id"))

    op.drop_table("training_run")
    with op.batch_alter_table("serving_change", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_serving_change_project_id"))

    op.drop_table("serving_change")
    with op.batch_alter_table("mask_version", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_mask_version_one_current", sqlite_where=sa.text("is_current"), postgresql_where=sa.text("is_current")
        )
        batch_op.drop_index("ix_mask_version_ls_annotation_id")
        batch_op.drop_index(batch_op.f("ix_mask_version_image_id"))

    op.drop_table("mask_version")
    with op.batch_alter_table("image_source", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_source_image_id"))

    op.drop_table("image_source")
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_model_version_one_serving",
            sqlite_where=sa.text("status = 'serving'"),
            postgresql_where=sa.text("status = 'serving'"),
        )
        batch_op.drop_index(batch_op.f("ix_model_version_project_id"))

    op.drop_table("model_version")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_subject"))
        batch_op.drop_index(batch_op.f("ix_image_project_id"))

    op.drop_table("image")
    with op.batch_alter_table("webhook_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_event_status"))
        batch_op.drop_index(batch_op.f("ix_webhook_event_action"))

    op.drop_table("webhook_event")
    op.drop_table("project")

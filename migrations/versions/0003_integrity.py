"""Security and data integrity: no clear source paths, label order by Label Studio's clock,
label issues (refused annotations, conflicting duplicates), the scheduler heartbeat.

- ``image_source.uri`` (a clear path or URL, which can hold patient names) becomes
  ``source_ref``, a keyed pseudonym. Existing values are pseudonymised when ``sonoseg db upgrade``
  hands over the installation's key (``config.attributes["pseudonym_key"]``); without a key
  (the bare ``alembic`` command) they are dropped rather than kept in clear.
- ``mask_version.ls_updated_at`` and ``mask_version.image_source_id``.
- tables ``label_issue`` and ``scheduler_heartbeat``.
- stored webhook payloads are reduced to the allow-list (no e-mail addresses, no user names).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

import backend.db.base

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _pseudonymise_existing_uris() -> None:
    from backend.services.pseudonyms import source_ref

    key = context.config.attributes.get("pseudonym_key")
    bind = op.get_bind()
    source = sa.table(
        "image_source", sa.column("id", sa.Integer), sa.column("uri", sa.Text), sa.column("source_ref", sa.String)
    )
    rows = bind.execute(sa.select(source.c.id, source.c.uri).where(source.c.uri.is_not(None))).all()
    for row_id, uri in rows:
        ref = source_ref(uri, key) if isinstance(key, bytes) else None
        bind.execute(source.update().where(source.c.id == row_id).values(source_ref=ref))


def _scrub_stored_webhooks() -> None:
    """Earlier versions stored webhook bodies verbatim (users' e-mail addresses included)."""
    from backend.labelstudio.payloads import scrub_webhook

    bind = op.get_bind()
    events = sa.table(
        "webhook_event", sa.column("id", sa.Integer), sa.column("payload", _JSON), sa.column("status", sa.String)
    )
    for row_id, payload, status in bind.execute(sa.select(events.c.id, events.c.payload, events.c.status)).all():
        if not isinstance(payload, dict):
            continue
        scrubbed = scrub_webhook(payload)
        if status != "pending":
            task = scrubbed.get("task")
            if isinstance(task, dict):
                task.pop("data", None)
            elif isinstance(task, list):
                for item in task:
                    if isinstance(item, dict):
                        item.pop("data", None)
        bind.execute(events.update().where(events.c.id == row_id).values(payload=scrubbed))


def upgrade() -> None:
    _scrub_stored_webhooks()
    with op.batch_alter_table("image_source", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_ref", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("file_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("file_bytes", sa.Integer(), nullable=True))
    _pseudonymise_existing_uris()
    with op.batch_alter_table("image_source", schema=None) as batch_op:
        batch_op.drop_column("uri")

    with op.batch_alter_table("mask_version", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ls_updated_at", backend.db.base.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("image_source_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_mask_version_image_source_id_image_source"),
            "image_source",
            ["image_source_id"],
            ["id"],
            ondelete="SET NULL",
        )

    op.create_table(
        "label_issue",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("dedupe_key", sa.String(length=64), nullable=False),
        sa.Column("ls_annotation_id", sa.Integer(), nullable=True),
        sa.Column("mask_version_ids", _JSON, nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.Column("created_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", backend.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('unknown_labels', 'conflicting_duplicate')", name=op.f("ck_label_issue_kind")),
        sa.CheckConstraint("status IN ('open', 'resolved')", name=op.f("ck_label_issue_status")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["image.id"], name=op.f("fk_label_issue_image_id_image"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_label_issue_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_label_issue")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_label_issue_dedupe_key")),
    )
    op.create_index(op.f("ix_label_issue_project_id"), "label_issue", ["project_id"], unique=False)
    op.create_index(op.f("ix_label_issue_status"), "label_issue", ["status"], unique=False)

    op.create_table(
        "scheduler_heartbeat",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("beat_at", backend.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_scheduler_heartbeat")),
    )


def downgrade() -> None:
    op.drop_table("scheduler_heartbeat")
    op.drop_index(op.f("ix_label_issue_status"), table_name="label_issue")
    op.drop_index(op.f("ix_label_issue_project_id"), table_name="label_issue")
    op.drop_table("label_issue")
    with op.batch_alter_table("mask_version", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_mask_version_image_source_id_image_source"), type_="foreignkey")
        batch_op.drop_column("image_source_id")
        batch_op.drop_column("ls_updated_at")
    with op.batch_alter_table("image_source", schema=None) as batch_op:
        # The clear paths are gone by design: a downgrade cannot bring them back.
        batch_op.add_column(sa.Column("uri", sa.Text(), nullable=True))
        batch_op.drop_column("file_bytes")
        batch_op.drop_column("file_sha256")
        batch_op.drop_column("source_ref")

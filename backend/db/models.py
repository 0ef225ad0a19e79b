"""The sonoseg schema: what was labelled, by whom, which model learnt from it, and how well.

Rules about the data live here, in the database, not in application code:
- an image is unique per project by its content hash (importing it twice yields one row);
- mask versions are append-only: a correction adds a version, a deletion marks it inactive;
- at most one *current* label mask per image, at most one *serving* model per project, and at
  most one *active* (queued or running) training run per project: all partial unique indexes;
- a webhook delivery is recorded once, by its event key;
- an image is leased to at most one annotator at a time (unique ``label_lease.image_id``), and a
  model version scores an image at most once (unique ``image_score`` (image, version)).

Enumerated columns are short strings guarded by named CHECK constraints (portable, and readable in
psql / sqlite3 without a lookup table). The allowed values are the ``*_VALUES`` tuples below.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from backend.db.base import Base, JSONType, UTCDateTime, utcnow

SPLIT_VALUES = ("train", "val", "test")
MASK_SOURCE_VALUES = ("annotation", "prediction", "import")
MODEL_STATUS_VALUES = ("training", "candidate", "serving", "retired", "failed")
RUN_TRIGGER_VALUES = ("annotations", "schedule", "manual", "start_training")
RUN_STATUS_VALUES = ("queued", "running", "succeeded", "failed", "cancelled")
EVENT_STATUS_VALUES = ("pending", "processed", "ignored", "failed")
SERVING_CHANGE_VALUES = ("promote", "rollback")
IMAGE_SOURCE_VALUES = ("labelstudio", "import")
LABEL_ISSUE_KIND_VALUES = ("unknown_labels", "conflicting_duplicate")
LABEL_ISSUE_STATUS_VALUES = ("open", "resolved")
SPLIT_CHANGE_KIND_VALUES = ("move", "freeze")

ACTIVE_RUN_STATUSES = ("queued", "running")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _where(clause: str) -> dict[str, Any]:
    """Partial-index WHERE clause for both SQLite and PostgreSQL."""
    return {"sqlite_where": text(clause), "postgresql_where": text(clause)}


class Project(Base):
    """A Label Studio project (or an offline dataset) and its label set."""

    __tablename__ = "project"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    ls_project_id: Mapped[int | None] = mapped_column(Integer, unique=True)
    label_config: Mapped[str | None] = mapped_column(Text)
    # Ordered label names; class index i (1-based) is class_names[i-1], 0 is background.
    class_names: Mapped[list[str]] = mapped_column(JSONType)
    # Per-project overrides of the retraining policy (None: use Settings).
    retrain_after: Mapped[int | None] = mapped_column(Integer)
    train_max_minutes: Mapped[float | None] = mapped_column(Float)
    # Set when a training trigger arrives while a run is active: one more run is due afterwards.
    retrain_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # False: only `sonoseg train` and START_TRAINING start runs (no count trigger, no nightly run).
    auto_retrain: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    # True once a curator set test images (`sonoseg import --split test`, a splits CSV, `sonoseg split
    # move --to test`) or ran `sonoseg split freeze`: automatic assignment then gives new subjects
    # train or val only, and `sonoseg split move` refuses to move into or out of test without --force.
    test_frozen: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # The active-learning strategy that ranks this project's work list (`sonoseg next`, /api/next): a
    # name of backend.active_learning.strategies.STRATEGY_NAMES. Checked where it is set, not by a
    # CHECK: the set of strategies grows with the code.
    al_strategy: Mapped[str] = mapped_column(String(32), default="default", server_default=text("'default'"))

    images: Mapped[list[Image]] = relationship(back_populates="project")


class Image(Base):
    """One 2D frame. Pixels live in the blob store under ``blob_key``; never in the database."""

    __tablename__ = "image"
    __table_args__ = (
        UniqueConstraint("project_id", "sha256"),
        CheckConstraint(_in("split", SPLIT_VALUES), name="split"),
        CheckConstraint("width > 0 AND height > 0", name="size"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))  # of the decoded grey pixels' PNG encoding
    blob_key: Mapped[str] = mapped_column(String(200))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    # Pseudonym only (e.g. "subj-0042"): never a real name or hospital id.
    subject: Mapped[str] = mapped_column(String(64), index=True)
    split: Mapped[str] = mapped_column(String(8))
    source_format: Mapped[str] = mapped_column(String(16))
    frame_index: Mapped[int] = mapped_column(Integer, default=0)
    # Allow-listed, non-identifying acquisition metadata (see backend.imaging.dicom.KEPT_DICOM_TAGS).
    acquisition: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    project: Mapped[Project] = relationship(back_populates="images")
    sources: Mapped[list[ImageSource]] = relationship(back_populates="image", cascade="all, delete-orphan")
    masks: Mapped[list[MaskVersion]] = relationship(back_populates="image", order_by="MaskVersion.version")


class ImageSource(Base):
    """Where an image came from: a Label Studio task, or an imported file path.

    One image may have several sources (the same file uploaded to two tasks); a Label Studio task
    maps to exactly one image.
    """

    __tablename__ = "image_source"
    __table_args__ = (
        UniqueConstraint("project_id", "ls_task_id"),
        CheckConstraint(_in("kind", IMAGE_SOURCE_VALUES), name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    ls_task_id: Mapped[int | None] = mapped_column(Integer)
    # A keyed pseudonym (``src-<32 hex>``, see services.pseudonyms.source_ref) of the Label Studio
    # image URL or the imported file's resolved path: never the path itself, because hospital file
    # and folder names carry patient names and record numbers. The same path or URL always gives
    # the same reference, so a curator holding the file finds its row (`sonoseg sources find`).
    source_ref: Mapped[str | None] = mapped_column(String(64))
    # Non-identifying facts about an imported file, to find it again: its bytes' sha256 and size.
    file_sha256: Mapped[str | None] = mapped_column(String(64))
    file_bytes: Mapped[int | None] = mapped_column(Integer)
    # False once Label Studio reports the task deleted; history is kept.
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    image: Mapped[Image] = relationship(back_populates="sources")


class MaskVersion(Base):
    """One version of one image's mask: class indices in a PNG in the blob store.

    Append-only. ``is_current`` marks the label mask used for training (an annotation or import);
    prediction masks are kept for the correction statistics but are never current.
    """

    __tablename__ = "mask_version"
    __table_args__ = (
        UniqueConstraint("image_id", "version"),
        CheckConstraint(_in("source", MASK_SOURCE_VALUES), name="source"),
        CheckConstraint("NOT (is_current AND source = 'prediction')", name="prediction_not_current"),
        Index("uq_mask_version_one_current", "image_id", unique=True, **_where("is_current")),
        Index("ix_mask_version_ls_annotation_id", "ls_annotation_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per image
    source: Mapped[str] = mapped_column(String(16))
    ls_annotation_id: Mapped[int | None] = mapped_column(Integer)
    author: Mapped[str | None] = mapped_column(String(200))
    blob_key: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    foreground_pixels: Mapped[int] = mapped_column(Integer, default=0)
    is_current: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    webhook_event_id: Mapped[int | None] = mapped_column(ForeignKey("webhook_event.id", ondelete="SET NULL"))
    # Label Studio's own ``updated_at`` of the annotation version: labels are ordered by it (not
    # by arrival), so an older delivery arriving last is kept as history but never becomes current.
    ls_updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # The imported file this label came from (imports only): tells a re-import of the same file
    # (a new version of its mask) from a second file with identical pixels (a possible conflict).
    image_source_id: Mapped[int | None] = mapped_column(ForeignKey("image_source.id", ondelete="SET NULL"))
    # Label Studio's ``lead_time`` of the annotation (seconds the annotator spent on it), annotations only;
    # None when Label Studio sent none. Correction effort per model version reads it.
    lead_time_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    image: Mapped[Image] = relationship(back_populates="masks")


model_version_mask = Table(
    "model_version_mask",
    Base.metadata,
    Column("model_version_id", ForeignKey("model_version.id", ondelete="CASCADE"), primary_key=True),
    Column("mask_version_id", ForeignKey("mask_version.id", ondelete="RESTRICT"), primary_key=True),
)
"""The exact mask versions a model version was trained on (its training-set snapshot)."""


class ModelVersion(Base):
    """An immutable trained model. Only ``status`` (and its timestamps) ever change."""

    __tablename__ = "model_version"
    __table_args__ = (
        CheckConstraint(_in("status", MODEL_STATUS_VALUES), name="status"),
        Index("uq_model_version_one_serving", "project_id", unique=True, **_where("status = 'serving'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    uid: Mapped[str] = mapped_column(String(64), unique=True)  # what Label Studio sees as model_version
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16))
    arch: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    checkpoint_key: Mapped[str | None] = mapped_column(String(200))
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    gate_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    parent: Mapped[ModelVersion | None] = relationship(remote_side="ModelVersion.id")
    training_masks: Mapped[list[MaskVersion]] = relationship(secondary=model_version_mask)


class ServingChange(Base):
    """Audit log of which version served when. Rollback replays it as a stack (promote pushes,
    rollback pops), so repeated rollbacks walk back through history instead of toggling."""

    __tablename__ = "serving_change"
    __table_args__ = (CheckConstraint(_in("kind", SERVING_CHANGE_VALUES), name="kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id", ondelete="CASCADE"))
    previous_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Prediction(Base):
    """A prediction served for an image, and how much the sonographer corrected it afterwards."""

    __tablename__ = "prediction"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), index=True)
    # None when no model existed yet ("untrained": an empty pre-annotation was served).
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id", ondelete="SET NULL"))
    model_version_uid: Mapped[str] = mapped_column(String(64))
    ls_task_id: Mapped[int | None] = mapped_column(Integer, index=True)
    mask_version_id: Mapped[int | None] = mapped_column(ForeignKey("mask_version.id", ondelete="SET NULL"))
    score: Mapped[float | None] = mapped_column(Float)
    uncertainty: Mapped[float | None] = mapped_column(Float)
    # The correction that followed: Dice between this prediction and the saved corrected mask.
    corrected_mask_version_id: Mapped[int | None] = mapped_column(ForeignKey("mask_version.id", ondelete="SET NULL"))
    correction_dice: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class TrainingRun(Base):
    """One attempt to train a model for a project. At most one queued/running per project."""

    __tablename__ = "training_run"
    __table_args__ = (
        CheckConstraint(_in("trigger", RUN_TRIGGER_VALUES), name="trigger"),
        CheckConstraint(_in("status", RUN_STATUS_VALUES), name="status"),
        Index(
            "uq_training_run_one_active",
            "project_id",
            unique=True,
            **_where(_in("status", ACTIVE_RUN_STATUSES)),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    trigger: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    progress: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)  # epoch, loss, val_dice...
    from_scratch: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Outbox and debounce: a queued run is handed to the broker once not_before has passed;
    # dispatched_at says when it last was (a lost message is re-sent). attempts counts claims.
    not_before: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class WebhookEvent(Base):
    """A raw Label Studio webhook delivery, stored before anything else happens to it."""

    __tablename__ = "webhook_event"
    __table_args__ = (CheckConstraint(_in("status", EVENT_STATUS_VALUES), name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # sha256 of the canonical JSON body: an identical re-delivery has the same key.
    event_key: Mapped[str] = mapped_column(String(64), unique=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    ls_project_id: Mapped[int | None] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class LabelIssue(Base):
    """A label sonoseg refused to use as training data until a person looks at it.

    - ``unknown_labels``: an annotation whose regions all carry labels the class map does not
      know; taking it would teach "no nerve here", so it never becomes a label;
    - ``conflicting_duplicate``: two source files with identical pixels and different masks;
      both versions are kept, neither is current, until a curator chooses
      (``sonoseg masks choose``).

    ``dedupe_key`` makes recording the same issue again (a replayed webhook, a re-import) a no-op.
    """

    __tablename__ = "label_issue"
    __table_args__ = (
        CheckConstraint(_in("kind", LABEL_ISSUE_KIND_VALUES), name="kind"),
        CheckConstraint(_in("status", LABEL_ISSUE_STATUS_VALUES), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)
    dedupe_key: Mapped[str] = mapped_column(String(64), unique=True)
    ls_annotation_id: Mapped[int | None] = mapped_column(Integer)
    mask_version_ids: Mapped[list[int]] = mapped_column(JSONType, default=list)
    detail: Mapped[str] = mapped_column(Text)
    resolution: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class SplitChange(Base):
    """Audit log of curators' split decisions: who moved which subject (or image) from where to where,
    and when a project's test split was frozen. Append-only.

    ``kind`` 'move': ``subject`` (always) and ``image_id`` (when the move was asked for by image id)
    name what moved; ``images`` counts the frames moved from ``from_split``. One move of a subject whose
    frames sat in several splits writes one row per split. 'freeze': the test split became frozen;
    ``from_split``/``to_split`` are empty. ``author``: the ``--by`` option or the OS user (a member of
    staff, never a patient).
    """

    __tablename__ = "split_change"
    __table_args__ = (
        CheckConstraint(_in("kind", SPLIT_CHANGE_KIND_VALUES), name="kind"),
        CheckConstraint(f"from_split IS NULL OR {_in('from_split', SPLIT_VALUES)}", name="from_split"),
        CheckConstraint(f"to_split IS NULL OR {_in('to_split', SPLIT_VALUES)}", name="to_split"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str | None] = mapped_column(String(64))  # a pseudonym, as in image.subject
    image_id: Mapped[int | None] = mapped_column(ForeignKey("image.id", ondelete="SET NULL"))
    from_split: Mapped[str | None] = mapped_column(String(8))
    to_split: Mapped[str | None] = mapped_column(String(8))
    images: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    forced: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    reason: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ImageScore(Base):
    """What one model version thought of one image: acquisition scores and a compact embedding.

    Written for the serving version after each promotion (``services.repredict``), read by active
    learning (``services.scores.candidates_for``). One row per (image, model version): a ranking
    never mixes two models' opinions, and a rollback finds the older version's scores still there.
    ``embedding`` holds ``embedding_dim`` little-endian float16 values (2 bytes each).
    """

    __tablename__ = "image_score"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id"),
        CheckConstraint("embedding_dim >= 0", name="embedding_dim"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id", ondelete="CASCADE"), index=True)
    entropy: Mapped[float] = mapped_column(Float)
    tta_disagreement: Mapped[float] = mapped_column(Float)
    boundary_uncertainty: Mapped[float] = mapped_column(Float)
    foreground_fraction: Mapped[float] = mapped_column(Float)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    embedding_dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class LabelLease(Base):
    """An image handed out to one annotator until ``expires_at`` (``sonoseg next``, ``/api/next``).

    At most one lease per image (the unique ``image_id``), which is what makes handing out atomic:
    a claim is an INSERT (or a compare-and-set UPDATE of an expired row), and the loser of a race
    gets an integrity error or zero rows, never the same image. A lease past ``expires_at`` is
    free for anyone to take over; a submitted annotation deletes it.
    """

    __tablename__ = "label_lease"
    __table_args__ = (
        Index("ix_label_lease_project_id_expires_at", "project_id", "expires_at"),
        CheckConstraint("expires_at > leased_at", name="expiry"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    # Whoever asked (``--annotator``, ``?annotator=``): a member of staff's handle, never a patient's.
    annotator: Mapped[str] = mapped_column(String(200))
    leased_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class SchedulerHeartbeat(Base):
    """When a scheduler (Celery beat) was last seen working: written by each dispatch tick.

    Without a scheduler, queued training runs are never handed to a worker; ``sonoseg status``,
    ``/health`` and the worker's start-up log read this row to say so.
    """

    __tablename__ = "scheduler_heartbeat"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str | None] = mapped_column(String(200))
    pid: Mapped[int | None] = mapped_column(Integer)
    beat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

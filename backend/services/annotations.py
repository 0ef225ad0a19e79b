"""Label Studio annotations become mask versions; deleted tasks and annotations are retired.

ONE implementation for every path that brings labels in: webhooks
(:mod:`backend.services.webhooks`), reconciliation (:mod:`backend.services.reconciliation`) and
the tests all call :func:`apply_annotation` and :func:`retire_tasks`, so a label recorded from a
webhook and the same label pulled by reconciliation produce the same rows, and applying either
twice changes nothing. Every function takes the caller's session and never commits.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Image, ImageSource, MaskVersion, Prediction, Project
from backend.errors import InvalidInput, NotReady
from backend.labelstudio.config import ClassMap, LabelConfig
from backend.labelstudio.payloads import LsAnnotation
from backend.labelstudio.results import results_to_mask
from backend.model.metrics import image_dice
from backend.services.label_issues import record_issue
from backend.services.masks import add_mask_version, deactivate_annotation, lock_images, read_mask
from backend.services.worklist import release_for_image
from backend.storage.blobs import BlobStore, staged_writes

log = logging.getLogger(__name__)

OutcomeKind = Literal["created", "updated", "unchanged", "history", "deactivated", "ignored", "refused"]
# Outcomes that mean a sonographer's annotation was recorded now (not a replay, not a skip): they end the
# image's lease. A skip does not (the lease runs out), nor does a replay: reconciliation replays every
# annotation, and would otherwise end a lease another annotator took since. A refused annotation opens a
# label issue, which takes the image out of the pool (services.scores) and so out of every work list.
SUBMITTED: tuple[OutcomeKind, ...] = ("created", "updated", "history")


@dataclass(frozen=True)
class AnnotationOutcome:
    """What applying one annotation did (see :func:`apply_annotation`)."""

    kind: OutcomeKind
    reason: str | None = None

    @property
    def changed(self) -> bool:
        """Whether the image's current label may have changed (a retrain trigger counts these)."""
        return self.kind in ("created", "updated", "deactivated")

    @property
    def recorded(self) -> bool:
        """Whether anything was written (a history version counts; an unchanged replay does not)."""
        return self.changed or self.kind == "history"


def author_of(annotation: LsAnnotation) -> str | None:
    """A stable, non-identifying author reference: Label Studio's user id, never the e-mail."""
    return f"ls-user:{annotation.completed_by}" if annotation.completed_by is not None else None


def apply_annotation(
    session: Session,
    store: BlobStore,
    project: Project,
    config: LabelConfig,
    image_id: int,
    annotation: LsAnnotation,
    *,
    webhook_event_id: int | None = None,
) -> AnnotationOutcome:
    """Record one Label Studio annotation of one stored image; idempotent.

    Outcomes: ``created`` (first version from this annotation), ``updated`` (its mask
    changed), ``unchanged``, ``history`` (stored, but an older edit than the current label,
    or content the image already has from another origin), ``deactivated`` (it is now a
    skip), ``ignored`` (a skip we never held as a label), or ``refused`` (every region
    carries a label the class map does not know: recorded as a label issue, never a label).
    """
    outcome = _apply(session, store, project, config, image_id, annotation, webhook_event_id)
    if outcome.kind in SUBMITTED:
        release_for_image(session, image_id)  # the annotator's lease on the image (services.worklist) ends
    return outcome


def _apply(
    session: Session,
    store: BlobStore,
    project: Project,
    config: LabelConfig,
    image_id: int,
    annotation: LsAnnotation,
    webhook_event_id: int | None,
) -> AnnotationOutcome:
    ann_id = annotation.id
    if annotation.was_cancelled:
        return AnnotationOutcome("deactivated" if deactivate_annotation(session, ann_id) else "ignored")
    lock_images(session, [image_id])
    image = session.get(Image, image_id)
    if image is None:
        raise NotReady(f"image {image_id} is gone")
    decoded = results_to_mask(
        annotation.results, config, ClassMap(tuple(project.class_names)), image.height, image.width
    )
    if decoded.region_count == 0 and decoded.ignored_labels:
        reason = (
            f"annotation {ann_id} (task {annotation.task_id}): every region carries labels the class map does "
            f"not know ({', '.join(decoded.ignored_labels)}; known: {', '.join(project.class_names)}); "
            "not used as a label, so the model is not taught that nothing is there"
        )
        record_issue(
            session,
            project_id=project.id,
            kind="unknown_labels",
            detail=reason,
            dedupe=(ann_id, annotation.updated_at),
            image_id=image.id,
            ls_annotation_id=ann_id,
        )
        return AnnotationOutcome("refused", reason)
    had_versions = (
        session.scalar(
            select(MaskVersion.id)
            .where(MaskVersion.ls_annotation_id == ann_id, MaskVersion.image_id == image.id, MaskVersion.active)
            .limit(1)
        )
        is not None
    )
    with staged_writes(store) as staged:
        write = add_mask_version(
            session,
            staged,
            project,
            image,
            decoded.mask,
            source="annotation",
            author=author_of(annotation),
            ls_annotation_id=ann_id,
            webhook_event_id=webhook_event_id,
            ls_updated_at=annotation.updated_at,
        )
    _record_lead_time(write.mask_version, annotation, created=write.created)
    if not write.created:
        return AnnotationOutcome("unchanged")
    if not write.current:
        return AnnotationOutcome("history")
    record_correction(session, store, image, write.mask_version, decoded.mask)
    return AnnotationOutcome("updated" if had_versions else "created")


def _record_lead_time(mv: MaskVersion, annotation: LsAnnotation, *, created: bool) -> None:
    """Label Studio's ``lead_time`` (seconds spent) onto the annotation's mask version: set on a new
    version; on a replay of the same annotation only filled in where it was missing (versions are
    append-only, a stored value is not rewritten)."""
    if annotation.lead_time is None or mv.ls_annotation_id != annotation.id:
        return
    if created or mv.lead_time_seconds is None:
        mv.lead_time_seconds = annotation.lead_time


def retire_tasks(session: Session, project_id: int, task_ids: Collection[int]) -> list[int]:
    """Deleted tasks: their sources go inactive; an image left with no active source loses its labels.

    Returns the task ids whose source was retired (the caller drops them from its caches). Used
    for ``TASKS_DELETED`` webhooks and for tasks reconciliation no longer finds in Label Studio.
    """
    if not task_ids:
        return []
    sources = list(
        session.scalars(
            select(ImageSource).where(
                ImageSource.project_id == project_id,
                ImageSource.ls_task_id.in_(list(task_ids)),
                ImageSource.active,
            )
        )
    )
    for source in sources:
        source.active = False
    session.flush()
    for image_id in sorted({s.image_id for s in sources}):
        still_used = session.scalars(
            select(ImageSource.id).where(ImageSource.image_id == image_id, ImageSource.active)
        ).first()
        if still_used is not None:
            continue
        annotation_ids = session.scalars(
            select(MaskVersion.ls_annotation_id)
            .where(MaskVersion.image_id == image_id, MaskVersion.active, MaskVersion.ls_annotation_id.is_not(None))
            .distinct()
        ).all()
        for ann_id in annotation_ids:
            if ann_id is not None:
                deactivate_annotation(session, ann_id)
    if sources:
        log.info("project %s: %d task source(s) retired", project_id, len(sources))
    return [s.ls_task_id for s in sources if s.ls_task_id is not None]


def active_task_ids(session: Session, project_id: int) -> set[int]:
    """Label Studio task ids with an active source in this project."""
    return {
        t
        for t in session.scalars(
            select(ImageSource.ls_task_id).where(
                ImageSource.project_id == project_id, ImageSource.ls_task_id.is_not(None), ImageSource.active
            )
        )
        if t is not None
    }


def deactivate_missing_annotations(session: Session, project_id: int, seen: Collection[int]) -> int:
    """Annotations we hold as labels that Label Studio no longer has (or that became skips)."""
    held = session.scalars(
        select(MaskVersion.ls_annotation_id)
        .join(Image, Image.id == MaskVersion.image_id)
        .where(
            Image.project_id == project_id,
            MaskVersion.active,
            MaskVersion.source == "annotation",
            MaskVersion.ls_annotation_id.is_not(None),
        )
        .distinct()
    ).all()
    gone = [a for a in held if a is not None and a not in seen]
    for ann_id in gone:
        deactivate_annotation(session, ann_id)
    return len(gone)


# -- correction effort ---------------------------------------------------------------------------
def correction_dice(predicted: NDArray[Any], corrected: NDArray[Any], n_classes: int) -> float:
    """Mean Dice over the foreground classes present in either mask; 1.0 when both are empty."""
    if predicted.shape != corrected.shape:
        raise InvalidInput(f"prediction {predicted.shape} and correction {corrected.shape} differ in size")
    present = [c for c in range(1, n_classes + 1) if (predicted == c).any() or (corrected == c).any()]
    if not present:
        return 1.0
    return float(np.mean([image_dice(predicted, corrected, c) for c in present]))


def record_correction(
    session: Session, store: BlobStore, image: Image, corrected: MaskVersion, corrected_mask: NDArray[Any]
) -> Prediction | None:
    """Link the image's latest served prediction to this label and store their Dice.

    A later correction of the same image (an updated annotation) replaces the link, so the
    Dice always measures the prediction against the label as finally saved.
    """
    prediction = session.scalars(
        select(Prediction)
        .where(Prediction.image_id == image.id, Prediction.mask_version_id.is_not(None))
        .order_by(Prediction.id.desc())
        .limit(1)
    ).first()
    if prediction is None or prediction.mask_version_id is None:
        return None
    served = session.get(MaskVersion, prediction.mask_version_id)
    if served is None:
        return None
    project = session.get(Project, image.project_id)
    n_classes = len(project.class_names) if project is not None else int(corrected_mask.max(initial=0))
    prediction.corrected_mask_version_id = corrected.id
    prediction.correction_dice = correction_dice(read_mask(store, served), corrected_mask, n_classes)
    session.flush()
    log.info(
        "prediction %s corrected by mask version %s: Dice %.3f", prediction.id, corrected.id, prediction.correction_dice
    )
    return prediction

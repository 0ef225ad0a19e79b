"""Labels held back from training until a person decides: recorded, listed, resolved.

Two kinds (see :class:`backend.db.models.LabelIssue`):

- ``unknown_labels``: a Label Studio annotation whose regions all carry labels the project's
  class map does not know. Taking it would store an all-background label ("no nerve here") and
  teach the model exactly that, so it is refused; the reason is kept here and in the webhook
  event, and ``sonoseg status`` shows it. (An annotation with *zero* regions is different: it is
  a valid empty label, "nothing visible".)
- ``conflicting_duplicate``: two imported files with identical pixels and different masks.
  Both mask versions are kept and neither is current (the frame is out of training) until a
  curator picks one with ``sonoseg masks choose``.

Recording is idempotent (a replayed webhook or a re-import finds the same ``dedupe_key``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import Image, LabelIssue, MaskVersion
from backend.errors import InvalidInput, NotFound
from backend.services.masks import LABEL_SOURCES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IssueView:
    """An issue as `sonoseg status` and `sonoseg masks issues` show it."""

    id: int
    project_id: int
    kind: str
    image_id: int | None
    ls_annotation_id: int | None
    mask_version_ids: tuple[int, ...]
    detail: str
    created_at: str

    @classmethod
    def of(cls, row: LabelIssue) -> IssueView:
        return cls(
            row.id,
            row.project_id,
            row.kind,
            row.image_id,
            row.ls_annotation_id,
            tuple(row.mask_version_ids or ()),
            row.detail,
            row.created_at.isoformat(),
        )


def _key(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def record_issue(
    session: Session,
    *,
    project_id: int,
    kind: str,
    detail: str,
    dedupe: Sequence[object],
    image_id: int | None = None,
    ls_annotation_id: int | None = None,
    mask_version_ids: Sequence[int] = (),
) -> LabelIssue:
    """The open issue for ``dedupe`` (its identifying parts), created if new."""
    key = _key(kind, project_id, *dedupe)
    existing = session.scalars(select(LabelIssue).where(LabelIssue.dedupe_key == key)).one_or_none()
    if existing is not None:
        return existing
    row = LabelIssue(
        project_id=project_id,
        kind=kind,
        status="open",
        dedupe_key=key,
        image_id=image_id,
        ls_annotation_id=ls_annotation_id,
        mask_version_ids=list(mask_version_ids),
        detail=detail[:2000],
        created_at=utcnow(),
    )
    with session.begin_nested():
        session.add(row)
        session.flush()
    log.warning("label issue %s (%s): %s", row.id, kind, detail)
    return row


def open_issues(session: Session, project_id: int | None = None, *, limit: int = 100) -> list[IssueView]:
    stmt = select(LabelIssue).where(LabelIssue.status == "open")
    if project_id is not None:
        stmt = stmt.where(LabelIssue.project_id == project_id)
    return [IssueView.of(r) for r in session.scalars(stmt.order_by(LabelIssue.id).limit(limit))]


def resolve_issues(session: Session, image_id: int, kind: str, resolution: str) -> int:
    rows = session.scalars(
        select(LabelIssue).where(LabelIssue.image_id == image_id, LabelIssue.kind == kind, LabelIssue.status == "open")
    ).all()
    for row in rows:
        row.status = "resolved"
        row.resolution = resolution
        row.resolved_at = utcnow()
    session.flush()
    return len(rows)


def choose_version(session: Session, image_id: int, version: int) -> MaskVersion:
    """Make ``version`` of the image its current label (a curator's decision), closing its
    conflict issues. Any active label version may be chosen, not only the conflicting ones."""
    image = session.get(Image, image_id)
    if image is None:
        raise NotFound(f"no image with id {image_id}")
    session.execute(select(Image.id).where(Image.id == image_id).with_for_update())
    chosen = session.scalars(
        select(MaskVersion).where(MaskVersion.image_id == image_id, MaskVersion.version == version)
    ).one_or_none()
    if chosen is None:
        raise NotFound(f"image {image_id} has no mask version {version}")
    if chosen.source not in LABEL_SOURCES or not chosen.active:
        raise InvalidInput(
            f"mask version {version} of image {image_id} is a {chosen.source} "
            f"{'(inactive) ' if not chosen.active else ''}version and cannot be the label"
        )
    for mv in session.scalars(select(MaskVersion).where(MaskVersion.image_id == image_id, MaskVersion.is_current)):
        mv.is_current = False
    session.flush()
    chosen.is_current = True
    session.flush()
    resolve_issues(session, image_id, "conflicting_duplicate", f"curator chose version {version}")
    log.info("image %s: version %s chosen as its label", image_id, version)
    return chosen

"""Mask versions: every label an image ever had, append-only.

A new annotation, correction or import adds version n+1 and makes it current (the label used for
training) when it is the newest label by Label Studio's own clock; earlier versions stay readable.
Writing content that is already stored adds nothing. A deleted Label Studio annotation marks its versions
inactive and the image falls back to its newest remaining active label, if any. Prediction masks
are versions too (source 'prediction'), kept to measure how much each suggestion was corrected,
but they are never current.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import Image, MaskVersion, Project
from backend.errors import InvalidInput, UnknownLabel
from backend.storage.blobs import BlobStore, StagedWrites

log = logging.getLogger(__name__)

LABEL_SOURCES = ("annotation", "import")


@dataclass(frozen=True)
class MaskWrite:
    """What :func:`add_mask_version` did: the version that now holds this content, whether it is
    new (False: identical to a version already stored, nothing written), and whether it is the
    image's current label."""

    mask_version: MaskVersion
    created: bool
    current: bool


def label_order_key(mv: MaskVersion) -> tuple[dt.datetime, int, int]:
    """How label versions of one image are ordered: Label Studio's ``updated_at`` when the label
    came from Label Studio (arrival order means nothing: webhooks come once, in any order, and
    reconciliation replays), else when sonoseg stored it; then annotation id, then version."""
    return (mv.ls_updated_at or mv.created_at, mv.ls_annotation_id or 0, mv.version)


def add_mask_version(
    session: Session,
    store: BlobStore | StagedWrites,
    project: Project,
    image: Image,
    mask: NDArray[Any],
    *,
    source: str,
    author: str | None = None,
    ls_annotation_id: int | None = None,
    webhook_event_id: int | None = None,
    ls_updated_at: dt.datetime | None = None,
    image_source_id: int | None = None,
    may_become_current: bool = True,
) -> MaskWrite:
    """Store ``mask`` (H x W class indices) as the image's next version, unless it is already stored.

    Label sources (annotation, import) become current when they are the newest label by
    :func:`label_order_key`; an older one (a late delivery) is kept as history. A label identical
    to the current one, or to a version of the same origin (annotation id, or imported file) with
    the same timestamp, is not a new version: re-imports and replays add nothing and do not
    count towards retraining. Predictions never become current. ``may_become_current=False``
    stores a label as history only (a conflicting duplicate, see services.label_issues).
    """
    from backend.imaging.io import encode_png

    if mask.shape != (image.height, image.width):
        raise InvalidInput(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but image {image.id} is {image.width}x{image.height}"
        )
    n_classes = len(project.class_names)
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > n_classes):
        raise UnknownLabel(
            f"mask holds class {int(mask.max())} but project {project.id} has classes 0..{n_classes} "
            f"(background + {', '.join(project.class_names)})"
        )
    mask8 = mask.astype(np.uint8)
    png = encode_png(mask8)
    sha = hashlib.sha256(png).hexdigest()  # the same digest as mask_sha256(mask) and the blob's
    # Serialise writers of this image's versions: lock its row (PostgreSQL; SQLite's
    # BEGIN IMMEDIATE already serialises), so two concurrent saves never take the same number.
    session.execute(select(Image.id).where(Image.id == image.id).with_for_update())
    is_label = source in LABEL_SOURCES
    current = current_mask_version(session, image) if is_label else None
    if is_label:
        same = _same_content(session, image, sha, current, ls_annotation_id, image_source_id, ls_updated_at)
        if same is not None:
            return MaskWrite(same, created=False, current=same.is_current)
    blob = store.put_bytes("masks", png, ".png")
    version = (session.scalar(select(func.max(MaskVersion.version)).where(MaskVersion.image_id == image.id)) or 0) + 1
    mv = MaskVersion(
        image_id=image.id,
        version=version,
        source=source,
        author=author,
        ls_annotation_id=ls_annotation_id,
        blob_key=blob.key,
        sha256=blob.sha256,
        foreground_pixels=int(np.count_nonzero(mask8)),
        is_current=False,
        active=True,
        webhook_event_id=webhook_event_id,
        ls_updated_at=ls_updated_at,
        image_source_id=image_source_id,
        created_at=utcnow(),
    )
    session.add(mv)
    session.flush()
    # Identical content from another origin (a second annotator, a second file) is provenance,
    # not a change of label: kept, not made current, so it does not count towards retraining.
    becomes_current = (
        is_label
        and may_become_current
        and (current is None or (current.sha256 != sha and label_order_key(mv) >= label_order_key(current)))
    )
    if becomes_current:
        if current is not None:
            current.is_current = False
            session.flush()
        mv.is_current = True
        session.flush()
    elif is_label and current is not None:
        log.info(
            "mask version %s is older than current version %s of image %s: kept as history", mv.id, current.id, image.id
        )
    log.info(
        "mask version %s (v%d, %s) for image %s%s",
        mv.id,
        version,
        source,
        image.id,
        " (current)" if becomes_current else "",
    )
    return MaskWrite(mv, created=True, current=becomes_current)


def _same_content(
    session: Session,
    image: Image,
    sha: str,
    current: MaskVersion | None,
    ls_annotation_id: int | None,
    image_source_id: int | None,
    ls_updated_at: dt.datetime | None,
) -> MaskVersion | None:
    """An already-stored version of the same origin that this write would merely repeat, or None.

    Same origin: the same Label Studio annotation, or the same imported file. It repeats the
    current version whatever its timestamp (a re-save without changes), and any other version
    with the same timestamp (a replayed delivery).
    """
    if ls_annotation_id is None and image_source_id is None:
        return None

    def same_origin(mv: MaskVersion) -> bool:
        if ls_annotation_id is not None:
            return mv.ls_annotation_id == ls_annotation_id
        return mv.image_source_id == image_source_id

    if current is not None and current.sha256 == sha and same_origin(current):
        return current
    candidates = session.scalars(
        select(MaskVersion)
        .where(
            MaskVersion.image_id == image.id,
            MaskVersion.active,
            MaskVersion.sha256 == sha,
            MaskVersion.source.in_(LABEL_SOURCES),
        )
        .order_by(MaskVersion.version.desc())
    )
    for candidate in candidates:
        if same_origin(candidate) and candidate.ls_updated_at == ls_updated_at:
            return candidate
    return None


def mask_sha256(mask: NDArray[Any]) -> str:
    """sha256 of the PNG a mask is stored as (the encoder is deterministic): equal masks, equal digests."""
    from backend.imaging.io import encode_png

    return hashlib.sha256(encode_png(mask.astype(np.uint8))).hexdigest()


def current_mask_version(session: Session, image: Image) -> MaskVersion | None:
    return session.scalars(
        select(MaskVersion).where(MaskVersion.image_id == image.id, MaskVersion.is_current)
    ).one_or_none()


def deactivate_annotation(session: Session, ls_annotation_id: int) -> list[MaskVersion]:
    """Mark every version from a deleted annotation inactive; re-point 'current' if needed."""
    versions = list(
        session.scalars(select(MaskVersion).where(MaskVersion.ls_annotation_id == ls_annotation_id, MaskVersion.active))
    )
    images = {mv.image_id for mv in versions if mv.is_current}
    for mv in versions:
        mv.active = False
        mv.is_current = False
    session.flush()
    for image_id in images:
        remaining = session.scalars(
            select(MaskVersion).where(
                MaskVersion.image_id == image_id,
                MaskVersion.active,
                MaskVersion.source.in_(LABEL_SOURCES),
            )
        ).all()
        if remaining:
            max(remaining, key=label_order_key).is_current = True
    session.flush()
    return versions


def lock_images(session: Session, image_ids: Sequence[int]) -> None:
    """Row-lock images (in id order, so concurrent writers cannot deadlock) before adding mask versions.

    A mask version's number is the image's highest version plus one: two transactions adding a
    version to the same image must not interleave (PostgreSQL; SQLite transactions are serial).
    """
    if image_ids:
        session.execute(select(Image.id).where(Image.id.in_(list(image_ids))).order_by(Image.id).with_for_update())


def read_mask(store: BlobStore, mv: MaskVersion) -> NDArray[Any]:
    from backend.imaging.io import decode_png_bytes

    return decode_png_bytes(store.get_bytes(mv.blob_key))

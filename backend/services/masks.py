"""Mask versions: every label an image ever had, append-only.

A new annotation, correction or import adds version n+1 and makes it current (the label used for
training); earlier versions stay readable. A deleted Label Studio annotation marks its versions
inactive and the image falls back to its newest remaining active label, if any. Prediction masks
are versions too (source 'prediction'), kept to measure how much each suggestion was corrected,
but they are never current.
"""

from __future__ import annotations

import logging

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend.db.models import Image, MaskVersion, Project
from backend.errors import InvalidInput, UnknownLabel
from backend.storage.blobs import BlobStore, StagedWrites

log = logging.getLogger(__name__)

LABEL_SOURCES = ("annotation", "import")


def add_mask_version(
    session: Session,
    store: BlobStore | StagedWrites,
    project: Project,
    image: Image,
    mask: np.ndarray,
    *,
    source: str,
    author: str | None = None,
    ls_annotation_id: int | None = None,
    webhook_event_id: int | None = None,
) -> MaskVersion:
    """Store ``mask`` (H x W class indices) as the image's next version.

    Label sources (annotation, import) become current; predictions never do.
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
    blob = store.put_bytes("masks", encode_png(mask8), ".png")
    # Serialise writers of this image's versions: lock its row (PostgreSQL; SQLite's
    # BEGIN IMMEDIATE already serialises), so two concurrent saves never take the same number.
    session.execute(select(Image.id).where(Image.id == image.id).with_for_update())
    version = (session.scalar(select(func.max(MaskVersion.version)).where(MaskVersion.image_id == image.id)) or 0) + 1
    is_label = source in LABEL_SOURCES
    if is_label:
        session.execute(
            update(MaskVersion).where(MaskVersion.image_id == image.id, MaskVersion.is_current).values(is_current=False)
        )
    mv = MaskVersion(
        image_id=image.id,
        version=version,
        source=source,
        author=author,
        ls_annotation_id=ls_annotation_id,
        blob_key=blob.key,
        sha256=blob.sha256,
        foreground_pixels=int(np.count_nonzero(mask8)),
        is_current=is_label,
        active=True,
        webhook_event_id=webhook_event_id,
    )
    session.add(mv)
    session.flush()
    log.info("mask version %s (v%d, %s) for image %s", mv.id, version, source, image.id)
    return mv


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
        fallback = session.scalars(
            select(MaskVersion)
            .where(
                MaskVersion.image_id == image_id,
                MaskVersion.active,
                MaskVersion.source.in_(LABEL_SOURCES),
            )
            .order_by(MaskVersion.version.desc())
        ).first()
        if fallback is not None:
            fallback.is_current = True
    session.flush()
    return versions


def read_mask(store: BlobStore, mv: MaskVersion) -> np.ndarray:
    from backend.imaging.io import decode_png_bytes

    return decode_png_bytes(store.get_bytes(mv.blob_key))

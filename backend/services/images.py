"""Images in, one row per distinct frame: content-hash deduplication and provenance.

An image's identity is the hash of its decoded grey pixels (shape + bytes), not of the file: the
same frame uploaded to Label Studio and imported from disk, or re-encoded, is one row. Pixels
are stored once as a lossless grey PNG in the blob store; original files are not kept, because
DICOM originals carry patient tags (see backend/imaging/dicom.py for what metadata is kept).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Image, ImageSource, Project
from backend.errors import InvalidInput, NotFound
from backend.services.splits import assign_split
from backend.storage.blobs import BlobStore, StagedWrites

log = logging.getLogger(__name__)


def pixel_hash(pixels: np.ndarray) -> str:
    """sha256 over the array's shape and C-order bytes (grey uint8, H x W)."""
    arr = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{arr.dtype.str}:{arr.shape[0]}x{arr.shape[1]}\n".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class AddedImage:
    image: Image
    created: bool  # False: the frame was already in the project (a new source may be recorded)


def add_image(
    session: Session,
    store: BlobStore | StagedWrites,
    project: Project,
    pixels: np.ndarray,
    *,
    subject: str,
    source_kind: str,
    uri: str | None = None,
    ls_task_id: int | None = None,
    source_format: str = "png",
    frame_index: int = 0,
    acquisition: dict[str, Any] | None = None,
) -> AddedImage:
    """Add a decoded 2D uint8 frame to ``project`` (idempotent by pixel hash)."""
    from backend.imaging.io import encode_png

    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise InvalidInput(f"expected a 2D uint8 grey image, got {pixels.dtype} {pixels.shape}")
    sha = pixel_hash(pixels)
    image = session.scalars(select(Image).where(Image.project_id == project.id, Image.sha256 == sha)).one_or_none()
    created = image is None
    if image is None:
        blob = store.put_bytes("images", encode_png(pixels), ".png")
        image = Image(
            project_id=project.id,
            sha256=sha,
            blob_key=blob.key,
            width=int(pixels.shape[1]),
            height=int(pixels.shape[0]),
            subject=subject,
            split=assign_split(subject, salt=str(project.id)),
            source_format=source_format,
            frame_index=frame_index,
            acquisition=dict(acquisition or {}),
        )
        session.add(image)
        session.flush()
        log.info("image %s added to project %s (%dx%d)", image.id, project.id, image.width, image.height)
    _record_source(session, project, image, source_kind, uri, ls_task_id)
    return AddedImage(image, created)


def _record_source(
    session: Session, project: Project, image: Image, kind: str, uri: str | None, ls_task_id: int | None
) -> None:
    if ls_task_id is not None:
        existing = session.scalars(
            select(ImageSource).where(ImageSource.project_id == project.id, ImageSource.ls_task_id == ls_task_id)
        ).one_or_none()
        if existing is not None:
            if existing.image_id != image.id:
                # The task's image changed in Label Studio: point the task at the new frame.
                log.warning("task %s now shows image %s (was %s)", ls_task_id, image.id, existing.image_id)
                existing.image_id = image.id
            existing.active = True
            existing.uri = uri or existing.uri
            return
    else:
        same = session.scalars(
            select(ImageSource).where(
                ImageSource.image_id == image.id, ImageSource.kind == kind, ImageSource.uri == uri
            )
        ).first()
        if same is not None:
            return
    session.add(ImageSource(project_id=project.id, image_id=image.id, kind=kind, uri=uri, ls_task_id=ls_task_id))
    session.flush()


def image_for_task(session: Session, project: Project, ls_task_id: int) -> Image | None:
    return session.scalars(
        select(Image)
        .join(ImageSource, ImageSource.image_id == Image.id)
        .where(ImageSource.project_id == project.id, ImageSource.ls_task_id == ls_task_id)
    ).one_or_none()


def load_pixels(store: BlobStore, image: Image) -> np.ndarray:
    from backend.imaging.io import decode_png_bytes

    return decode_png_bytes(store.get_bytes(image.blob_key))


def get_image(session: Session, image_id: int) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFound(f"no image with id {image_id}")
    return image

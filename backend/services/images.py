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
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from backend.db.models import Image, ImageSource, Project
from backend.errors import Conflict, InvalidInput
from backend.services.splits import check_split, split_for_new_image
from backend.storage.blobs import BlobStore, StagedWrites

log = logging.getLogger(__name__)


# Built once: an import looks an image up per frame, and building the statement cost more than running it.
_IMAGE_BY_HASH = select(Image).where(Image.project_id == bindparam("project_id"), Image.sha256 == bindparam("sha256"))


def pixel_hash(pixels: NDArray[Any]) -> str:
    """sha256 over the array's shape and C-order bytes (grey uint8, H x W)."""
    arr = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{arr.dtype.str}:{arr.shape[0]}x{arr.shape[1]}\n".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class SourceInfo:
    """Where a frame came from, as stored: never a clear path or URL (see ImageSource)."""

    kind: str  # 'labelstudio' | 'import'
    ref: str | None = None  # services.pseudonyms.source_ref of the path or URL
    ls_task_id: int | None = None
    file_sha256: str | None = None
    file_bytes: int | None = None


@dataclass(frozen=True)
class AddedImage:
    image: Image
    created: bool  # False: the frame was already in the project (a new source may be recorded)
    source: ImageSource


def add_image(
    session: Session,
    store: BlobStore | StagedWrites,
    project: Project,
    pixels: NDArray[Any],
    *,
    subject: str,
    source: SourceInfo,
    source_format: str = "png",
    frame_index: int = 0,
    acquisition: dict[str, Any] | None = None,
    split: str | None = None,
) -> AddedImage:
    """Add a decoded 2D uint8 frame to ``project`` (idempotent by pixel hash).

    ``split``: a curator's choice for a new frame; None: automatic (see
    :func:`~backend.services.splits.split_for_new_image`). A frame already in the project keeps its
    split; asking for another one is a :class:`~backend.errors.Conflict` (`sonoseg split move`).
    """
    from backend.imaging.io import encode_png

    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise InvalidInput(f"expected a 2D uint8 grey image, got {pixels.dtype} {pixels.shape}")
    sha = pixel_hash(pixels)
    image = session.scalars(_IMAGE_BY_HASH, {"project_id": project.id, "sha256": sha}).one_or_none()
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
            split=split_for_new_image(session, project, subject, split),
            source_format=source_format,
            frame_index=frame_index,
            acquisition=dict(acquisition or {}),
        )
        session.add(image)  # flushed with its source row, below
    elif split is not None and check_split(split) != image.split:
        raise Conflict(
            f"these pixels are already image {image.id} of project {project.name!r}, in {image.split}, not "
            f"{check_split(split)} (an identical frame in two splits would leak; move its subject with "
            f"`sonoseg split move --project {project.name} --image {image.id} --to {check_split(split)}`)"
        )
    row = _record_source(session, project, image, source, new_image=created)
    if created:
        log.info("image %s added to project %s (%dx%d)", image.id, project.id, image.width, image.height)
    return AddedImage(image, created, row)


def _record_source(
    session: Session, project: Project, image: Image, info: SourceInfo, *, new_image: bool = False
) -> ImageSource:
    """The image's source row for ``info``: found again, or new (a new image has no file sources yet)."""
    if info.ls_task_id is not None:
        existing = session.scalars(
            select(ImageSource).where(ImageSource.project_id == project.id, ImageSource.ls_task_id == info.ls_task_id)
        ).one_or_none()
        if existing is not None:
            if existing.image_id != image.id:
                # The task's image changed in Label Studio: point the task at the new frame.
                log.warning("task %s now shows image %s (was %s)", info.ls_task_id, image.id, existing.image_id)
                existing.image_id = image.id
            existing.active = True
            existing.source_ref = info.ref or existing.source_ref
            return existing
    elif not new_image:
        same = session.scalars(
            select(ImageSource).where(
                ImageSource.image_id == image.id, ImageSource.kind == info.kind, ImageSource.source_ref == info.ref
            )
        ).first()
        if same is not None:
            same.file_sha256 = info.file_sha256 or same.file_sha256
            same.file_bytes = info.file_bytes if info.file_bytes is not None else same.file_bytes
            return same
    row = ImageSource(
        project_id=project.id,
        image=image,  # by the relationship: a new image and its source are flushed together
        kind=info.kind,
        source_ref=info.ref,
        ls_task_id=info.ls_task_id,
        file_sha256=info.file_sha256,
        file_bytes=info.file_bytes,
    )
    session.add(row)
    session.flush()
    return row


def record_source(session: Session, project: Project, image: Image, info: SourceInfo) -> ImageSource:
    """Record where an already stored image also lives (a Label Studio task made by ``sonoseg push``)."""
    return _record_source(session, project, image, info)


def load_pixels(store: BlobStore, image: Image) -> NDArray[Any]:
    from backend.imaging.io import decode_png_bytes

    return decode_png_bytes(store.get_bytes(image.blob_key))


@dataclass(frozen=True)
class FoundSource:
    image_id: int
    project_id: int
    matched_by: str  # 'path' (the file's pseudonym) or 'content' (its bytes' sha256)


def find_sources(session: Session, data_dir: Path, paths: list[Path]) -> list[tuple[Path, list[FoundSource]]]:
    """Images imported from these files: by the pseudonym of the resolved path, else by the
    file's sha256 (a file that moved since it was imported, or each frame of a cine file)."""
    from backend.services.pseudonyms import load_or_create_key, source_ref

    key = load_or_create_key(data_dir)
    out: list[tuple[Path, list[FoundSource]]] = []
    for path in paths:
        resolved = str(path.resolve())
        rows = session.scalars(
            select(ImageSource).where(ImageSource.kind == "import", ImageSource.source_ref == source_ref(resolved, key))
        ).all()
        matched = "path"
        if not rows:  # moved since, or a multi-frame file (each frame has its own reference)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            rows = session.scalars(select(ImageSource).where(ImageSource.file_sha256 == digest)).all()
            matched = "content"
        out.append((path, [FoundSource(r.image_id, r.project_id, matched) for r in rows]))
    return out

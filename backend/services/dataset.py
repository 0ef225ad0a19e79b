"""Curators' dataset operations: import files from disk, export the labelled dataset.

Import reads every supported format through backend.imaging (each DICOM cine frame or volume
slice becomes one image), deduplicates by pixel hash, assigns the split by subject, and stores an
optional mask per image as an 'import' mask version. One file is one unit of work: a bad file is
reported and skipped, and leaves nothing behind in the database or the store.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Image, MaskVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidInput, SonosegError
from backend.services.images import add_image
from backend.services.masks import add_mask_version
from backend.services.projects import get_or_create_project
from backend.services.pseudonyms import load_or_create_key, pseudonymise
from backend.settings import Settings
from backend.storage.blobs import BlobStore, staged_writes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".nii.gz", ".mha", ".mhd")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def iter_image_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files given directly, plus supported files found (recursively, sorted) in given folders."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and _suffix(child) in IMAGE_SUFFIXES and not child.name.startswith("."):
                    yield child
        else:
            yield path


@dataclass
class ImportReport:
    files: int = 0
    images_added: int = 0
    images_existing: int = 0
    masks_added: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


def _find_mask(mask_dir: Path | None, image_path: Path) -> Path | None:
    if mask_dir is None:
        return None
    stem = _stem(image_path)
    for candidate in sorted(mask_dir.iterdir()):
        if candidate.is_file() and _stem(candidate) == stem and _suffix(candidate) in IMAGE_SUFFIXES:
            return candidate
    return None


def import_files(
    factory: SessionFactory,
    store: BlobStore,
    settings: Settings,
    *,
    project_name: str,
    class_names: tuple[str, ...],
    paths: list[Path],
    mask_dir: Path | None = None,
    subject: str | None = None,
    subject_from: str = "file",
) -> ImportReport:
    """Import image files (and matching masks by file stem) into a project.

    ``subject``: one raw subject identifier for every file; otherwise ``subject_from`` says where
    to take it: 'file' (each file is a subject: cine frames stay together) or 'parent' (the
    folder name, for datasets laid out one folder per patient). Raw identifiers are pseudonymised.
    """
    from backend.imaging.io import read_image, read_mask as read_mask_file

    if subject_from not in ("file", "parent"):
        raise InvalidInput(f"subject_from must be 'file' or 'parent', not {subject_from!r}")
    key = load_or_create_key(settings.data_dir)
    with unit_of_work(factory) as session:
        project_id = get_or_create_project(session, project_name, class_names=class_names).id
    report = ImportReport()
    for path in iter_image_files(paths):
        report.files += 1
        raw_subject = subject or (path.parent.name if subject_from == "parent" else str(path.resolve()))
        try:
            frames = read_image(path, max_side=settings.max_image_side, max_bytes=settings.max_image_bytes)
            mask_path = _find_mask(mask_dir, path)
            mask = read_mask_file(mask_path, max_side=settings.max_image_side) if mask_path else None
            with staged_writes(store) as staged, unit_of_work(factory) as session:
                project = session.get_one(Project, project_id)
                for frame in frames:
                    added = add_image(
                        session,
                        staged,
                        project,
                        frame.pixels,
                        subject=pseudonymise(raw_subject, key),
                        source_kind="import",
                        uri=str(path.resolve()) + (f"#frame={frame.frame_index}" if len(frames) > 1 else ""),
                        source_format=frame.source_format,
                        frame_index=frame.frame_index,
                        acquisition=dict(frame.metadata),
                    )
                    if added.created:
                        report.images_added += 1
                    else:
                        report.images_existing += 1
                    if mask is not None and len(frames) == 1:
                        add_mask_version(session, staged, project, added.image, mask, source="import", author="import")
                        report.masks_added += 1
        except SonosegError as exc:
            log.warning("skipped %s: %s", path, exc.message)
            report.errors.append((str(path), exc.message))
    return report


def export_dataset(
    session: Session, store: BlobStore, project: Project, out_dir: Path, *, splits: tuple[str, ...] = ("train", "val", "test")
) -> int:
    """Write ``images/``, ``masks/`` (current label masks, class-index PNGs) and ``manifest.csv``.

    Only images with a current label are exported. File names are image ids; the manifest maps
    them to subject pseudonyms, splits and mask versions. Returns the number of pairs written.
    """
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    rows = session.execute(
        select(Image, MaskVersion)
        .join(MaskVersion, (MaskVersion.image_id == Image.id) & MaskVersion.is_current)
        .where(Image.project_id == project.id, Image.split.in_(splits))
        .order_by(Image.id)
    ).all()
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "image_id", "image_sha256", "subject", "split", "width", "height", "mask_version", "mask_source", "classes"])
        for image, mv in rows:
            name = f"{image.id:06d}.png"
            (out_dir / "images" / name).write_bytes(store.get_bytes(image.blob_key))
            (out_dir / "masks" / name).write_bytes(store.get_bytes(mv.blob_key))
            writer.writerow([name, image.id, image.sha256, image.subject, image.split, image.width, image.height, mv.version, mv.source, "|".join(project.class_names)])
    return len(rows)


__all__ = ["ImportReport", "export_dataset", "import_files", "iter_image_files"]

"""Curators' dataset operations: import files from disk, export the labelled dataset.

Import reads every supported format through backend.imaging (each DICOM cine frame or volume
slice becomes one image), deduplicates by pixel hash, assigns the split by subject, and stores an
optional mask per image as an 'import' mask version. One file is one unit of work: a bad file is
reported and skipped, and leaves nothing behind in the database or the store.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Image, MaskVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidInput, SonosegError
from backend.services.images import AddedImage, SourceInfo, add_image
from backend.services.label_issues import record_issue, resolve_issues
from backend.services.masks import add_mask_version, current_mask_version, mask_sha256
from backend.services.projects import get_or_create_project
from backend.services.pseudonyms import load_or_create_key, pseudonymise, source_ref
from backend.settings import Settings
from backend.storage.blobs import BlobStore, StagedWrites, staged_writes

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
    masks_unchanged: int = 0  # identical to the mask already stored for that file: no new version
    errors: list[tuple[str, str]] = field(default_factory=list)
    # (file, message): identical pixels to another file, different mask; neither is used until chosen
    conflicts: list[tuple[str, str]] = field(default_factory=list)


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
    from backend.imaging.budget import shared_budget
    from backend.imaging.io import read_image
    from backend.imaging.io import read_mask as read_mask_file

    if subject_from not in ("file", "parent"):
        raise InvalidInput(f"subject_from must be 'file' or 'parent', not {subject_from!r}")
    key = load_or_create_key(settings.data_dir)
    budget = shared_budget(settings.decode_memory_bytes)
    with unit_of_work(factory) as session:
        project_id = get_or_create_project(session, project_name, class_names=class_names).id
    report = ImportReport()
    for path in iter_image_files(paths):
        report.files += 1
        resolved = path.resolve()
        raw_subject = subject or (path.parent.name if subject_from == "parent" else str(resolved))
        try:
            file_sha, file_bytes = _file_digest(path)
            frames = read_image(
                path, max_side=settings.max_image_side, max_bytes=settings.max_image_bytes, budget=budget
            )
            mask_path = _find_mask(mask_dir, path)
            mask = read_mask_file(mask_path, max_side=settings.max_image_side, budget=budget) if mask_path else None
            with staged_writes(store) as staged, unit_of_work(factory) as session:
                project = session.get_one(Project, project_id)
                for frame in frames:
                    where = str(resolved) + (f"#frame={frame.frame_index}" if len(frames) > 1 else "")
                    added = add_image(
                        session,
                        staged,
                        project,
                        frame.pixels,
                        subject=pseudonymise(raw_subject, key),
                        source=SourceInfo(
                            "import", ref=source_ref(where, key), file_sha256=file_sha, file_bytes=file_bytes
                        ),
                        source_format=frame.source_format,
                        frame_index=frame.frame_index,
                        acquisition=dict(frame.metadata),
                    )
                    if added.created:
                        report.images_added += 1
                    else:
                        report.images_existing += 1
                    if mask is not None and len(frames) == 1:
                        outcome = _import_mask(session, staged, project, added, mask)
                        if outcome == "added":
                            report.masks_added += 1
                        elif outcome == "unchanged":
                            report.masks_unchanged += 1
                        else:
                            report.conflicts.append((str(path), outcome))
        except SonosegError as exc:
            log.warning("skipped %s: %s", path, exc.message)
            report.errors.append((str(path), exc.message))
    return report


def _file_digest(path: Path) -> tuple[str, int]:
    """sha256 and size of a file's bytes: what lets a curator find its row again without its name."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    return digest.hexdigest(), size


def _import_mask(session: Session, store: StagedWrites, project: Project, added: AddedImage, mask: NDArray[Any]) -> str:
    """Store an imported file's mask: 'added', 'unchanged', or a conflict message.

    A conflict is a second file with the same pixels as an earlier one and a different mask
    (usgra-seg has such a pair). Taking whichever came last would silently pick one label, so
    both versions are kept, neither is current (the frame leaves training), and a label issue
    asks the curator to choose (`sonoseg masks choose`).
    """
    image, source = added.image, added.source
    sha = mask_sha256(mask)
    current = current_mask_version(session, image)
    if current is not None and current.sha256 == sha:
        return "unchanged"
    others = _latest_import_labels(session, image.id, exclude_source=source.id)
    conflicting = [mv for mv in others if mv.sha256 != sha]
    write = add_mask_version(
        session,
        store,
        project,
        image,
        mask,
        source="import",
        author="import",
        image_source_id=source.id,
        may_become_current=not conflicting,
    )
    if not write.created:  # this file's mask as stored before: any conflict is already recorded
        return "unchanged"
    if not conflicting:
        return "added"
    for mv in conflicting:
        mv.is_current = False
    session.flush()
    versions = sorted({mv.version for mv in conflicting} | {write.mask_version.version})
    message = (
        f"image {image.id} has identical pixels to another imported file but a different mask (versions "
        f"{', '.join(map(str, versions))}); neither is used for training until a curator runs "
        f"`sonoseg masks choose --image {image.id} --version N`"
    )
    resolve_issues(session, image.id, "conflicting_duplicate", "superseded by a newer conflict")
    record_issue(
        session,
        project_id=project.id,
        kind="conflicting_duplicate",
        detail=message,
        dedupe=(image.id, *sorted({mv.sha256 for mv in conflicting} | {sha})),
        image_id=image.id,
        mask_version_ids=sorted({mv.id for mv in conflicting} | {write.mask_version.id}),
    )
    return message


def _latest_import_labels(session: Session, image_id: int, *, exclude_source: int) -> list[MaskVersion]:
    """The newest active import version of each other imported file of this image."""
    rows = session.scalars(
        select(MaskVersion)
        .where(
            MaskVersion.image_id == image_id,
            MaskVersion.active,
            MaskVersion.source == "import",
            MaskVersion.image_source_id.is_not(None),
            MaskVersion.image_source_id != exclude_source,
        )
        .order_by(MaskVersion.version)
    ).all()
    latest: dict[int, MaskVersion] = {}
    for mv in rows:
        latest[mv.image_source_id or 0] = mv
    return list(latest.values())


def export_dataset(
    session: Session,
    store: BlobStore,
    project: Project,
    out_dir: Path,
    *,
    splits: tuple[str, ...] = ("train", "val", "test"),
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
        writer.writerow(
            [
                "file",
                "image_id",
                "image_sha256",
                "subject",
                "split",
                "width",
                "height",
                "mask_version",
                "mask_source",
                "classes",
            ]
        )
        for image, mv in rows:
            name = f"{image.id:06d}.png"
            (out_dir / "images" / name).write_bytes(store.get_bytes(image.blob_key))
            (out_dir / "masks" / name).write_bytes(store.get_bytes(mv.blob_key))
            writer.writerow(
                [
                    name,
                    image.id,
                    image.sha256,
                    image.subject,
                    image.split,
                    image.width,
                    image.height,
                    mv.version,
                    mv.source,
                    "|".join(project.class_names),
                ]
            )
    return len(rows)


__all__ = ["ImportReport", "export_dataset", "import_files", "iter_image_files"]

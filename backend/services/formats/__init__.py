"""Exports in the formats people train with, and nnU-Net datasets read back.

- :mod:`.png`: ``images/``, ``masks/`` (class-index PNGs) and ``manifest.csv``: sonoseg's own layout;
- :mod:`.nnunet`: an nnU-Net v2 raw dataset (``DatasetNNN_Name/``), subject-grouped folds in
  ``splits_final.json``, and :func:`.nnunet.read_nnunet`, the reading side for ``sonoseg import``;
- :mod:`.labelstudio_json`: a Label Studio tasks file whose annotations are our masks as brush RLE.

Every exporter is a core service: it takes the caller's session and store, only reads the
database, writes into a new or empty folder (:mod:`.output_dir`) and reports what it wrote as a
frozen dataclass. Progress is an optional ``on_item`` callback so that presentation (tqdm or log
lines) stays in the CLI.

This module holds what the exporters share: which images an export takes (:func:`select_items`).
It must not import its submodules (they import it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import SPLIT_VALUES, Image, ImageSource, MaskVersion, Project
from backend.errors import InvalidInput

__all__ = ["ExportItem", "OnItem", "check_splits", "sanitise_name", "select_items"]

OnItem = Callable[[], None]
"""Called once per image written; the CLI turns it into a progress bar or log lines."""


@dataclass(frozen=True)
class ExportItem:
    """One image an export may write, with its current label (None: unlabelled) and provenance."""

    image_id: int
    subject: str  # pseudonym
    split: str
    width: int
    height: int
    image_sha256: str
    image_key: str  # blob key of the stored grey PNG
    mask_version: int | None
    mask_source: str | None
    mask_key: str | None  # blob key of the current label's class-index PNG
    source_ref: str | None  # pseudonymised reference of the image's first active source

    @property
    def labelled(self) -> bool:
        return self.mask_key is not None


def check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    """The splits asked for (all when none), refusing unknown names rather than exporting nothing."""
    unknown = sorted(set(splits) - set(SPLIT_VALUES))
    if unknown:
        raise InvalidInput(f"unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLIT_VALUES)}")
    return tuple(s for s in SPLIT_VALUES if s in splits) if splits else SPLIT_VALUES


def select_items(
    session: Session, project: Project, *, splits: Sequence[str] = SPLIT_VALUES, include_unlabelled: bool = False
) -> list[ExportItem]:
    """The project's images in these splits, by image id, each with its current label mask.

    An image without a current label (never labelled, or held back by a label issue) comes only
    with ``include_unlabelled``. ``source_ref`` is the first (oldest) active source's reference:
    the one a curator holding the original file finds with ``sonoseg sources find``.
    """
    wanted = check_splits(splits)
    first_source = (
        select(ImageSource.source_ref)
        .where(ImageSource.image_id == Image.id, ImageSource.active)
        .order_by(ImageSource.id)
        .limit(1)
        .correlate(Image)
        .scalar_subquery()
    )
    stmt = (
        select(Image, MaskVersion, first_source)
        .outerjoin(MaskVersion, (MaskVersion.image_id == Image.id) & MaskVersion.is_current)
        .where(Image.project_id == project.id, Image.split.in_(wanted))
        .order_by(Image.id)
    )
    if not include_unlabelled:
        stmt = stmt.where(MaskVersion.id.is_not(None))
    items = []
    for image, mv, ref in session.execute(stmt):
        items.append(
            ExportItem(
                image_id=image.id,
                subject=image.subject,
                split=image.split,
                width=image.width,
                height=image.height,
                image_sha256=image.sha256,
                image_key=image.blob_key,
                mask_version=mv.version if mv is not None else None,
                mask_source=mv.source if mv is not None else None,
                mask_key=mv.blob_key if mv is not None else None,
                source_ref=ref,
            )
        )
    return items


_NOT_NAME = re.compile(r"[^A-Za-z0-9_]+")


def sanitise_name(text: str, *, fallback: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9_]`` (runs of anything else become one ``_``), or ``fallback``.

    nnU-Net parses dataset folders and case ids from file names; spaces, dots and dashes there
    break its parsing or the shell commands people paste.
    """
    cleaned = _NOT_NAME.sub("_", text).strip("_")
    return re.sub("_{2,}", "_", cleaned) or fallback

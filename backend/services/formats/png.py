"""sonoseg's own export: ``images/``, ``masks/`` and ``manifest.csv``.

The files are the stored blobs as they are (grey PNGs; masks as class-index PNGs, 0 background,
``i`` = ``class_names[i-1]``), named ``<image id:06d>.png`` so an image and its mask share a name.
The manifest is what makes the folder a dataset: subject pseudonym and split (keep subjects
together when re-splitting), mask version and source (which label this is), and the source
reference (find the original file again with ``sonoseg sources find``, without a clear path).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from backend.db.models import SPLIT_VALUES, Project
from backend.services.formats import OnItem, check_splits, select_items
from backend.services.formats.output_dir import fresh_output_dir
from backend.storage.blobs import BlobStore

__all__ = ["MANIFEST_COLUMNS", "PngExport", "export_png"]

MANIFEST_COLUMNS = (
    "file",
    "image_id",
    "image_sha256",
    "subject",
    "split",
    "width",
    "height",
    "mask_version",  # empty: no label (only with include_unlabelled; no file in masks/)
    "mask_source",
    "classes",
    "source_ref",
)


@dataclass(frozen=True)
class PngExport:
    out_dir: Path
    pairs: int  # images written with their mask
    unlabelled: int  # images written without a mask (include_unlabelled)


def export_png(
    session: Session,
    store: BlobStore,
    project: Project,
    out_dir: Path,
    *,
    splits: tuple[str, ...] = SPLIT_VALUES,
    include_unlabelled: bool = False,
    on_item: OnItem | None = None,
) -> PngExport:
    """Write the project's labelled images (and, with ``include_unlabelled``, the others) to ``out_dir``.

    ``out_dir`` must be new or empty (else :class:`~backend.errors.InvalidInput`, nothing written).
    """
    splits = check_splits(splits)  # before the folder is made: a typo writes nothing
    with fresh_output_dir(out_dir):
        items = select_items(session, project, splits=splits, include_unlabelled=include_unlabelled)
        (out_dir / "images").mkdir()
        (out_dir / "masks").mkdir()
        pairs = unlabelled = 0
        with open(out_dir / "manifest.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(MANIFEST_COLUMNS)
            for item in items:
                name = f"{item.image_id:06d}.png"
                (out_dir / "images" / name).write_bytes(store.get_bytes(item.image_key))
                if item.mask_key is not None:
                    (out_dir / "masks" / name).write_bytes(store.get_bytes(item.mask_key))
                    pairs += 1
                else:
                    unlabelled += 1
                writer.writerow(
                    [
                        name,
                        item.image_id,
                        item.image_sha256,
                        item.subject,
                        item.split,
                        item.width,
                        item.height,
                        "" if item.mask_version is None else item.mask_version,
                        item.mask_source or "",
                        "|".join(project.class_names),
                        item.source_ref or "",
                    ]
                )
                if on_item is not None:
                    on_item()
    return PngExport(out_dir=out_dir, pairs=pairs, unlabelled=unlabelled)

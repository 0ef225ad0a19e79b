"""Dataset statistics for curators (``sonoseg stats``): what is labelled, of what, by whom.

Two phases, so that no transaction is held while masks are read (with SQLite every transaction
holds the write lock, see backend/db/session.py):

1. :func:`count_dataset` (in the caller's unit of work): every count that SQL can aggregate
   (images and labels per split and subject, annotators, versions by source, conflicts) in a
   fixed number of queries whatever the project's size, plus the store keys of the current labels;
2. :func:`measure_labels` (no session): reads each current label mask once, in one linear pass,
   for the per-class pixel statistics (images containing the class, pixel prevalence, objects and
   their sizes), reporting progress through ``on_item(done, total)``.

:func:`dataset_stats` runs both for a caller that holds a session anyway.

Objects are the 8-connected components of a class's pixels (``scipy.ndimage.label`` with a 3 x 3
structure), as in ``backend.model.predict.keep_largest_component``: a thin oblique nerve drawn
with a brush stays one object. Prevalence is class pixels over all pixels of labelled images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from backend.db.models import MASK_SOURCE_VALUES, SPLIT_VALUES, Image, LabelIssue, MaskVersion, Project
from backend.services.masks import LABEL_SOURCES
from backend.storage.blobs import BlobStore

CONNECTIVITY = 8
UNKNOWN_AUTHOR = "(unknown)"
_STRUCTURE = np.ones((3, 3), bool)  # 8-connectivity

Progress = Callable[[int, int], None]
"""``on_item(done, total)``: called after each mask read."""


@dataclass(frozen=True)
class SplitCount:
    split: str
    images: int
    labelled: int


@dataclass(frozen=True)
class SubjectCount:
    subject: str  # a pseudonym
    split: str
    images: int
    labelled: int


@dataclass(frozen=True)
class Count:
    name: str
    count: int


@dataclass(frozen=True)
class SizeSummary:
    """Object sizes in pixels; median and p95 by linear interpolation (``numpy.percentile``)."""

    min: int
    median: float
    p95: float
    max: int


@dataclass(frozen=True)
class ClassStats:
    index: int  # mask value (1-based)
    name: str
    images: int  # labelled images with at least one pixel of the class
    pixels: int
    prevalence: float  # pixels / labelled pixels (0.0 when nothing is labelled)
    objects: int  # 8-connected components over all labelled images
    sizes: SizeSummary | None  # None when there are no objects


@dataclass(frozen=True)
class LabelRef:
    """A current label to measure: where its mask is stored."""

    image_id: int
    mask_key: str


@dataclass(frozen=True)
class DatasetCounts:
    """Everything :func:`count_dataset` aggregates in SQL, and the current labels to read."""

    project_id: int
    project: str
    class_names: tuple[str, ...]
    splits: tuple[SplitCount, ...]  # every split, in SPLIT_VALUES order
    subjects: tuple[SubjectCount, ...]  # by subject pseudonym
    labelled_pixels: int
    annotators: tuple[Count, ...]  # current annotation labels per author, most first
    versions_by_source: tuple[Count, ...]  # all mask versions ever stored, every source
    images_with_several_label_versions: int  # > 1 label (annotation/import) version, active or not
    current_by_source: tuple[Count, ...]  # current labels per source, every source
    conflicting_duplicates: int  # images with an open conflicting_duplicate issue
    labels: tuple[LabelRef, ...]


@dataclass(frozen=True)
class DatasetStats:
    """``sonoseg stats``; :meth:`to_json` for ``--json``."""

    project_id: int
    project: str
    class_names: tuple[str, ...]
    images: int
    labelled: int
    labelled_pixels: int
    splits: tuple[SplitCount, ...]
    subjects: tuple[SubjectCount, ...]
    classes: tuple[ClassStats, ...]  # project.class_names order
    annotators: tuple[Count, ...]
    versions_by_source: tuple[Count, ...]
    images_with_several_label_versions: int
    current_by_source: tuple[Count, ...]
    conflicting_duplicates: int
    connectivity: int = CONNECTIVITY

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["subjects_count"] = len(self.subjects)
        return out


def count_dataset(session: Session, project: Project) -> DatasetCounts:
    """The SQL half of :func:`dataset_stats`: a fixed number of aggregate queries."""
    pid = project.id
    in_project = Image.project_id == pid
    current = and_(MaskVersion.image_id == Image.id, MaskVersion.is_current)

    per_subject = session.execute(
        select(Image.subject, Image.split, func.count(Image.id), func.count(MaskVersion.id))
        .outerjoin(MaskVersion, current)
        .where(in_project)
        .group_by(Image.subject, Image.split)
        .order_by(Image.subject, Image.split)
    ).all()
    subjects = tuple(SubjectCount(str(s), str(sp), int(n), int(lab)) for s, sp, n, lab in per_subject)
    by_split = {split: [0, 0] for split in SPLIT_VALUES}
    for row in subjects:
        by_split[row.split][0] += row.images
        by_split[row.split][1] += row.labelled
    splits = tuple(SplitCount(split, n, lab) for split, (n, lab) in by_split.items())

    labelled_pixels = session.scalar(
        select(func.coalesce(func.sum(Image.width * Image.height), 0)).join(MaskVersion, current).where(in_project)
    )
    annotators = session.execute(
        select(MaskVersion.author, func.count(MaskVersion.id))
        .join(Image, MaskVersion.image_id == Image.id)
        .where(in_project, MaskVersion.is_current, MaskVersion.source == "annotation")
        .group_by(MaskVersion.author)
    ).all()
    all_versions = dict(
        session.execute(
            select(MaskVersion.source, func.count(MaskVersion.id))
            .join(Image, MaskVersion.image_id == Image.id)
            .where(in_project)
            .group_by(MaskVersion.source)
        ).all()
    )
    current_versions = dict(
        session.execute(
            select(MaskVersion.source, func.count(MaskVersion.id))
            .join(Image, MaskVersion.image_id == Image.id)
            .where(in_project, MaskVersion.is_current)
            .group_by(MaskVersion.source)
        ).all()
    )
    conflicts = conflicting_duplicates(session, pid)
    labels = session.execute(
        select(MaskVersion.image_id, MaskVersion.blob_key)
        .join(Image, MaskVersion.image_id == Image.id)
        .where(in_project, MaskVersion.is_current)
        .order_by(MaskVersion.image_id)
    ).all()
    return DatasetCounts(
        project_id=pid,
        project=project.name,
        class_names=tuple(project.class_names),
        splits=splits,
        subjects=subjects,
        labelled_pixels=int(labelled_pixels or 0),
        annotators=tuple(
            sorted((Count(a or UNKNOWN_AUTHOR, int(n)) for a, n in annotators), key=lambda c: (-c.count, c.name)),
        ),
        versions_by_source=tuple(Count(s, int(all_versions.get(s, 0))) for s in MASK_SOURCE_VALUES),
        images_with_several_label_versions=images_with_several_label_versions(session, pid),
        current_by_source=tuple(Count(s, int(current_versions.get(s, 0))) for s in MASK_SOURCE_VALUES),
        conflicting_duplicates=conflicts,
        labels=tuple(LabelRef(int(i), str(k)) for i, k in labels),
    )


def images_with_several_label_versions(session: Session, project_id: int) -> int:
    """Images with more than one label (annotation/import) version, active or not: one statement."""
    several = (
        select(MaskVersion.image_id)
        .join(Image, MaskVersion.image_id == Image.id)
        .where(Image.project_id == project_id, MaskVersion.source.in_(LABEL_SOURCES))
        .group_by(MaskVersion.image_id)
        .having(func.count(MaskVersion.id) > 1)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(several)) or 0)


def conflicting_duplicates(session: Session, project_id: int) -> int:
    """Images with an open ``conflicting_duplicate`` label issue: one statement."""
    n = session.scalar(
        select(func.count(func.distinct(LabelIssue.image_id))).where(
            LabelIssue.project_id == project_id,
            LabelIssue.kind == "conflicting_duplicate",
            LabelIssue.status == "open",
            LabelIssue.image_id.is_not(None),
        )
    )
    return int(n or 0)


class ClassAccumulator:
    """Per-class pixel counts, image counts and object sizes over masks added one at a time."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.pixels = np.zeros(n_classes + 1, np.int64)
        self.images = np.zeros(n_classes + 1, np.int64)
        self.sizes: list[list[NDArray[np.int64]]] = [[] for _ in range(n_classes + 1)]

    def add(self, mask: NDArray[Any]) -> None:
        counts = np.bincount(np.asarray(mask, np.int64).ravel(), minlength=self.n_classes + 1)[: self.n_classes + 1]
        self.pixels += counts
        self.images += counts > 0
        for cls in np.flatnonzero(counts[1:]) + 1:
            self.sizes[cls].append(object_sizes(mask, int(cls)))

    def classes(self, class_names: Sequence[str], labelled_pixels: int) -> tuple[ClassStats, ...]:
        out = []
        for cls, name in enumerate(class_names, start=1):
            if cls > self.n_classes:
                break
            sizes = np.concatenate(self.sizes[cls]) if self.sizes[cls] else np.zeros(0, np.int64)
            out.append(
                ClassStats(
                    index=cls,
                    name=name,
                    images=int(self.images[cls]),
                    pixels=int(self.pixels[cls]),
                    prevalence=float(self.pixels[cls]) / labelled_pixels if labelled_pixels else 0.0,
                    objects=int(sizes.size),
                    sizes=summarise_sizes(sizes),
                )
            )
        return tuple(out)


def object_sizes(mask: NDArray[Any], cls: int) -> NDArray[np.int64]:
    """Pixel counts of the 8-connected components of class ``cls`` in ``mask``."""
    labels, n = ndimage.label(mask == cls, structure=_STRUCTURE)
    sizes: NDArray[np.int64] = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)
    return sizes


def summarise_sizes(sizes: NDArray[Any]) -> SizeSummary | None:
    if sizes.size == 0:
        return None
    return SizeSummary(
        min=int(sizes.min()),
        median=float(np.median(sizes)),
        p95=float(np.percentile(sizes, 95)),
        max=int(sizes.max()),
    )


def read_mask_key(store: BlobStore, key: str) -> NDArray[Any]:
    from backend.imaging.io import decode_png_bytes

    return decode_png_bytes(store.get_bytes(key))


def measure_labels(store: BlobStore, counts: DatasetCounts, on_item: Progress | None = None) -> DatasetStats:
    """The mask half of :func:`dataset_stats`: each current label read once, no session needed."""
    acc = ClassAccumulator(len(counts.class_names))
    total = len(counts.labels)
    for done, ref in enumerate(counts.labels, start=1):
        acc.add(read_mask_key(store, ref.mask_key))
        if on_item is not None:
            on_item(done, total)
    return DatasetStats(
        project_id=counts.project_id,
        project=counts.project,
        class_names=counts.class_names,
        images=sum(s.images for s in counts.splits),
        labelled=sum(s.labelled for s in counts.splits),
        labelled_pixels=counts.labelled_pixels,
        splits=counts.splits,
        subjects=counts.subjects,
        classes=acc.classes(counts.class_names, counts.labelled_pixels),
        annotators=counts.annotators,
        versions_by_source=counts.versions_by_source,
        images_with_several_label_versions=counts.images_with_several_label_versions,
        current_by_source=counts.current_by_source,
        conflicting_duplicates=counts.conflicting_duplicates,
    )


def dataset_stats(
    session: Session, store: BlobStore, project: Project, on_item: Progress | None = None
) -> DatasetStats:
    """:func:`count_dataset` then :func:`measure_labels`. Reads every current mask inside the
    caller's transaction: a caller that must not hold one that long (the CLI) calls the two halves."""
    return measure_labels(store, count_dataset(session, project), on_item)

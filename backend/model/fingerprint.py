"""A training set's fingerprint: what the planner needs to know about the data, measured once.

nnU-Net's central idea (Isensee et al., 2021) is that no configuration is fixed: a planner reads
the dataset's fingerprint and derives the network grid, patch and batch from it. This is the
fingerprint for 2D ultrasound frames: frame sizes and aspect ratios, pixel spacing when the files
carry it, intensity statistics, and per class the size of its objects (connected components),
which decide how far frames may be downscaled before a structure gets too small to segment.

Pure numpy/scipy on (image, mask) pairs; no torch, no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from backend.errors import InvalidInput

MAX_INTENSITY_SAMPLES = 200_000


@dataclass(frozen=True)
class ClassObjects:
    """Objects of one class over the training masks (areas in natural pixels).

    Sizes are of each image's *largest* component of the class (the structure that was labelled),
    so specks of brush noise do not pass for small objects; ``objects`` counts all components."""

    name: str
    images_with_class: int
    objects: int
    median_area: float
    p10_area: float  # a small object of this class: what must stay segmentable after downscaling
    median_short_side: float  # of the objects' bounding boxes

    @property
    def p10_diameter(self) -> float:
        """Equivalent-circle diameter of the 10th-percentile object."""
        return 2.0 * math.sqrt(self.p10_area / math.pi) if self.p10_area > 0 else 0.0


@dataclass(frozen=True)
class DatasetFingerprint:
    n_images: int
    median_size: tuple[int, int]  # (height, width)
    min_size: tuple[int, int]
    max_size: tuple[int, int]
    distinct_sizes: int
    median_aspect: float  # width / height
    spacing: tuple[float, float] | None  # (row, column) mm per pixel, when every file says so
    intensity_mean: float
    intensity_std: float
    intensity_p005: float
    intensity_p995: float
    image_mean_spread: float  # std of the per-image means: how much gain varies between frames
    classes: tuple[ClassObjects, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(
    pairs: Sequence[tuple[NDArray[Any], NDArray[Any]]],
    classes: Sequence[str],
    *,
    spacings: Sequence[tuple[float, float] | None] | None = None,
    seed: int = 0,
) -> DatasetFingerprint:
    """Measure ``pairs`` of (uint8 (H, W) image, class-index mask); ``classes`` names mask values 1..K."""
    if not pairs:
        raise InvalidInput("a fingerprint needs at least one labelled image")
    sizes = np.array([im.shape[:2] for im, _ in pairs], dtype=np.int64)
    rng = np.random.default_rng(seed)
    per_image = max(1, MAX_INTENSITY_SAMPLES // len(pairs))
    samples = []
    means = []
    for image, _ in pairs:
        flat = image.reshape(-1)
        means.append(float(flat.mean()))
        take = flat if flat.size <= per_image else flat[rng.integers(0, flat.size, per_image)]
        samples.append(take.astype(np.float32))
    values = np.concatenate(samples)
    objects = tuple(_class_objects(pairs, c, name) for c, name in enumerate(classes, start=1))
    spacing = None
    if spacings and all(s is not None for s in spacings) and len(spacings) == len(pairs):
        spacing = tuple(float(np.median([s[i] for s in spacings if s is not None])) for i in (0, 1))
    median = (int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1])))
    return DatasetFingerprint(
        n_images=len(pairs),
        median_size=median,
        min_size=(int(sizes[:, 0].min()), int(sizes[:, 1].min())),
        max_size=(int(sizes[:, 0].max()), int(sizes[:, 1].max())),
        distinct_sizes=len({(int(h), int(w)) for h, w in sizes}),
        median_aspect=float(np.median(sizes[:, 1] / sizes[:, 0])),
        spacing=spacing,  # type: ignore[arg-type]
        intensity_mean=float(values.mean()),
        intensity_std=float(values.std()),
        intensity_p005=float(np.percentile(values, 0.5)),
        intensity_p995=float(np.percentile(values, 99.5)),
        image_mean_spread=float(np.std(means)),
        classes=objects,
    )


def _class_objects(pairs: Sequence[tuple[NDArray[Any], NDArray[Any]]], index: int, name: str) -> ClassObjects:
    areas: list[int] = []
    short_sides: list[int] = []
    components = 0
    for _, mask in pairs:
        binary = mask == index
        if not binary.any():
            continue
        labels, n = ndimage.label(binary, structure=np.ones((3, 3), bool))
        components += n
        counts = np.bincount(labels.ravel())[1:]
        largest = int(counts.argmax())
        areas.append(int(counts[largest]))
        box = ndimage.find_objects(labels)[largest]
        if box is not None:
            short_sides.append(min(box[0].stop - box[0].start, box[1].stop - box[1].start))
    if not areas:
        return ClassObjects(name, 0, 0, 0.0, 0.0, 0.0)
    return ClassObjects(
        name=name,
        images_with_class=len(areas),
        objects=components,
        median_area=float(np.median(areas)),
        p10_area=float(np.percentile(areas, 10)),
        median_short_side=float(np.median(short_sides)) if short_sides else 0.0,
    )

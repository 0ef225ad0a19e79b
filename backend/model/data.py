"""Training data: labelled frames in, normalised network-grid cases and sampled patches out.

The workers feed :class:`TrainData` from the database (a list of (uint8 image, int mask) pairs plus
the class names); :func:`load_pairs_from_dirs` builds the same thing from an images dir and a masks
dir. Preprocessing (:func:`prepare_image`) is shared with the Predictor so training and serving see
identical inputs: resample by ``spec.input_scale``, then z-score (see
:class:`~backend.model.spec.Normalization`).

Patch sampling follows nnU-Net: in each batch the last ``round(batch * oversample_foreground)``
patches are forced to contain a foreground pixel of a randomly chosen class present in the case,
the rest are drawn uniformly; cases smaller than the patch are zero-padded symmetrically, exactly as
inference pads a frame (zero is the mean after z-scoring; padded mask pixels are background).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from backend.errors import InvalidInput
from backend.model.image_files import list_images, read_image, read_mask, stem_of
from backend.model.resample import resize_image, resize_mask, scaled_size
from backend.model.spec import ModelSpec, Normalization

log = logging.getLogger(__name__)

Pair = tuple[NDArray[Any], NDArray[Any]]


@dataclass(frozen=True, eq=False)
class TrainData:
    """Labelled frames: ``pairs`` of (uint8 (H, W) image, integer (H, W) mask with values in
    0..len(classes)), foreground ``classes`` names, and optionally an explicit validation set
    (otherwise ``TrainConfig.val_fraction`` of ``pairs`` is held out)."""

    pairs: Sequence[Pair]
    classes: tuple[str, ...]
    val_pairs: Sequence[Pair] | None = None
    names: Sequence[str] | None = field(default=None)
    # One subject per pair (a patient, a cine clip): the held-out split never shares one with
    # training. None: every frame is its own subject.
    subjects: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not self.classes:
            raise InvalidInput("training needs at least one foreground class name")
        if not self.pairs:
            raise InvalidInput("training needs at least one labelled image")
        if self.subjects is not None and len(self.subjects) != len(self.pairs):
            raise InvalidInput(f"{len(self.subjects)} subjects for {len(self.pairs)} images")
        for i, pair in enumerate([*self.pairs, *(self.val_pairs or [])]):
            check_pair(pair, len(self.classes), f"pair {i}")


def check_pair(pair: Pair, n_foreground: int, what: str) -> None:
    """Raise :class:`InvalidInput` unless ``pair`` is a usable (image, mask)."""
    image, mask = pair
    if image.ndim != 2 or image.dtype != np.uint8:
        raise InvalidInput(f"{what}: image must be uint8 (H, W), got {image.dtype} {image.shape}")
    if mask.shape != image.shape:
        raise InvalidInput(f"{what}: mask shape {mask.shape} differs from image shape {image.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise InvalidInput(f"{what}: mask must hold integer class indices, got {mask.dtype}")
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > n_foreground):
        raise InvalidInput(
            f"{what}: mask values {int(mask.min())}..{int(mask.max())} outside 0..{n_foreground} "
            f"({n_foreground} foreground classes)"
        )


def load_pairs_from_dirs(images_dir: Path, masks_dir: Path, classes: Sequence[str] | None = None) -> TrainData:
    """Pair files by stem (``a.png`` with ``a.png``/``a.nii.gz``...). Without ``classes``, names
    ``class_1..class_K`` are made up from the largest mask value."""
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise InvalidInput(f"not a directory: {images_dir if not images_dir.is_dir() else masks_dir}")
    masks = {stem_of(p): p for p in list_images(masks_dir)}
    pairs: list[Pair] = []
    names: list[str] = []
    for image_path in list_images(images_dir):
        stem = stem_of(image_path)
        if stem not in masks:
            log.warning("no mask for %s, skipped", image_path.name)
            continue
        pairs.append((read_image(image_path), read_mask(masks[stem])))
        names.append(stem)
    if not pairs:
        raise InvalidInput(f"no image in {images_dir} has a mask with the same name in {masks_dir}")
    if classes is None:
        top = max(int(m.max()) for _, m in pairs)
        classes = [f"class_{i}" for i in range(1, max(top, 1) + 1)]
    return TrainData(pairs=pairs, classes=tuple(classes), names=names)


def split_validation(
    n: int, fraction: float, seed: int, subjects: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """Shuffled (train, val) indices; at least one training index; no validation when n < 2.

    With ``subjects``, whole subjects are held out (shuffled, until about ``fraction`` of the
    frames), so no subject is on both sides: frames of one patient or one cine clip are near
    duplicates, and choosing the best epoch on them measures memory, not generalisation.
    """
    if not 0 <= fraction < 1:
        raise InvalidInput(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    if subjects is None:
        order = rng.permutation(n).tolist()
        n_val = min(round(n * fraction), n - 1) if n >= 2 else 0
        return sorted(order[n_val:]), sorted(order[:n_val])
    if len(subjects) != n:
        raise InvalidInput(f"{len(subjects)} subjects for {n} images")
    groups: dict[str, list[int]] = {}
    for i, subject in enumerate(subjects):
        groups.setdefault(subject, []).append(i)
    keys = sorted(groups)
    if len(keys) < 2:
        return list(range(n)), []
    target = round(n * fraction)
    val: list[int] = []
    for k in (keys[i] for i in rng.permutation(len(keys))):
        if len(val) >= target or len(val) + len(groups[k]) > n - 1:
            continue
        if val and len(val) + len(groups[k]) > target * 1.5:
            continue  # a big subject would overshoot: try the next one
        val.extend(groups[k])
    held = set(val)
    return [i for i in range(n) if i not in held], sorted(val)


def subjects_from_names(names: Sequence[str], pattern: str) -> list[str]:
    """One subject per file name: the regular expression's first group (or whole match)."""
    import re

    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise InvalidInput(f"--subject-regex {pattern!r} is not a regular expression: {exc}") from exc
    out = []
    for name in names:
        match = regex.search(name)
        if match is None:
            raise InvalidInput(f"--subject-regex {pattern!r} does not match file name {name!r}")
        out.append(match.group(1) if regex.groups else match.group(0))
    return out


def subjects_from_csv(names: Sequence[str], path: Path) -> list[str]:
    """One subject per file stem from a CSV with columns ``file`` (name or stem) and ``subject``."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"cannot read the subjects CSV {path}: {exc}") from exc
    if not rows or "file" not in rows[0] or "subject" not in rows[0]:
        raise InvalidInput(f"the subjects CSV {path} needs the columns 'file' and 'subject'")
    table = {stem_of(Path(r["file"])): r["subject"] for r in rows if r.get("file")}
    missing = [n for n in names if n not in table]
    if missing:
        raise InvalidInput(f"the subjects CSV {path} has no row for {len(missing)} image(s), e.g. {missing[0]!r}")
    return [table[n] for n in names]


# -- preprocessing -----------------------------------------------------------------------------


def normalize_image(image: NDArray[Any], norm: Normalization) -> NDArray[Any]:
    """Float32 z-score of ``image`` (a flat image maps to zeros, not NaN)."""
    x = image.astype(np.float32, copy=False)
    if norm.scheme == "zscore_image":
        mean, std = float(x.mean()), float(x.std())
    else:
        mean, std = norm.mean, norm.std
    return ((x - mean) / max(std, 1e-8)).astype(np.float32, copy=False)


def dataset_normalization(images: Sequence[NDArray[Any]]) -> Normalization:
    """``zscore_dataset`` statistics over all pixels of ``images``."""
    total = sum(int(im.size) for im in images)
    mean = sum(float(im.astype(np.float64).sum()) for im in images) / total
    var = sum(float(((im.astype(np.float64) - mean) ** 2).sum()) for im in images) / total
    return Normalization("zscore_dataset", mean=mean, std=max(var**0.5, 1e-8))


def prepare_image(image: NDArray[Any], spec: ModelSpec) -> NDArray[Any]:
    """uint8 natural-size frame -> float32 network-grid input (resampled, then normalised)."""
    size = scaled_size((image.shape[0], image.shape[1]), spec.input_scale)
    resized = resize_image(image, size) if size != image.shape else image
    return normalize_image(resized, spec.normalization)


@dataclass(frozen=True, eq=False)
class Case:
    """One preprocessed training case on the network grid, with foreground coordinates per class."""

    image: NDArray[np.float32]  # (h, w)
    mask: NDArray[np.int64]  # (h, w)
    foreground: dict[int, NDArray[Any]]  # class -> (k, 2) int coords


def prepare_case(pair: Pair, spec: ModelSpec) -> Case:
    image, mask = pair
    net_image = prepare_image(image, spec)
    net_mask = resize_mask(mask, (net_image.shape[0], net_image.shape[1]), spec.num_classes)
    fg = {c: np.argwhere(net_mask == c) for c in range(1, spec.num_classes)}
    return Case(net_image, net_mask, {c: v for c, v in fg.items() if len(v)})


class PatchSampler:
    """Draws (images (B, 1, ph, pw) float32, masks (B, ph, pw) int64) batches from cases."""

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: tuple[int, int],
        batch_size: int,
        oversample_foreground: float,
        rng: np.random.Generator,
    ) -> None:
        if not cases:
            raise InvalidInput("no training cases")
        self.cases = cases
        self.patch = patch_size
        self.batch_size = batch_size
        self.n_random = round(batch_size * (1 - oversample_foreground))
        self.rng = rng

    def sample(self) -> tuple[NDArray[Any], NDArray[Any]]:
        ph, pw = self.patch
        images = np.zeros((self.batch_size, 1, ph, pw), np.float32)
        masks = np.zeros((self.batch_size, ph, pw), np.int64)
        for b in range(self.batch_size):
            case = self.cases[int(self.rng.integers(len(self.cases)))]
            y0, x0 = self._corner(case, force_fg=b >= self.n_random)
            self._crop_into(case, y0, x0, images[b, 0], masks[b])
        return images, masks

    def _corner(self, case: Case, *, force_fg: bool) -> tuple[int, int]:
        """Top-left corner in case coordinates; may be negative or overhang (padding)."""
        h, w = case.mask.shape
        ph, pw = self.patch
        # Valid corner range: the patch lies inside the case, or is centred when the case is smaller,
        # with the odd pixel of padding at the bottom/right exactly as inference pads
        # (backend.model.inference.pad_to_multiple: top = (ph - h) // 2).
        lo_y, hi_y = (0, h - ph) if h >= ph else (-((ph - h) // 2), -((ph - h) // 2))
        lo_x, hi_x = (0, w - pw) if w >= pw else (-((pw - w) // 2), -((pw - w) // 2))
        if force_fg and case.foreground:
            classes = sorted(case.foreground)
            coords = case.foreground[classes[int(self.rng.integers(len(classes)))]]
            cy, cx = coords[int(self.rng.integers(len(coords)))]
            # A corner that keeps the chosen pixel inside the patch, clipped to the valid range.
            y0 = int(np.clip(cy - self.rng.integers(ph), lo_y, hi_y))
            x0 = int(np.clip(cx - self.rng.integers(pw), lo_x, hi_x))
            return y0, x0
        return int(self.rng.integers(lo_y, hi_y + 1)), int(self.rng.integers(lo_x, hi_x + 1))

    def _crop_into(self, case: Case, y0: int, x0: int, image_out: NDArray[Any], mask_out: NDArray[Any]) -> None:
        h, w = case.mask.shape
        ph, pw = self.patch
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1, sx1 = min(y0 + ph, h), min(x0 + pw, w)
        dy0, dx0 = sy0 - y0, sx0 - x0
        image_out[dy0 : dy0 + sy1 - sy0, dx0 : dx0 + sx1 - sx0] = case.image[sy0:sy1, sx0:sx1]
        mask_out[dy0 : dy0 + sy1 - sy0, dx0 : dx0 + sx1 - sx0] = case.mask[sy0:sy1, sx0:sx1]

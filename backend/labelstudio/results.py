"""Class-index masks <-> Label Studio ``brushlabels`` results.

Outgoing (predictions): one region per label present in the mask, alpha 0/255 (a 0/1 mask
would be invisible), sized to the whole image. Incoming (annotations): every region of our
brush tag is thresholded, regions of the same label are unioned, and the labels are painted
in class-index order, so where regions of different labels overlap the label with the
higher class index (later in the config) wins.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, SupportsFloat

import numpy as np
import numpy.typing as npt

from backend.errors import InvalidInput, UnknownLabel
from backend.labelstudio.config import ClassMap, LabelConfig
from backend.labelstudio.rle import mask_to_rle, rle_to_mask

__all__ = ["RESULT_TYPE", "DecodedAnnotation", "image_size_from_results", "mask_to_results", "results_to_mask"]

logger = logging.getLogger(__name__)

RESULT_TYPE = "brushlabels"
ALPHA_THRESHOLD = 127
"""Annotated masks have anti-aliased edges; alpha above this counts as painted."""


@dataclass(frozen=True)
class DecodedAnnotation:
    """An annotation's brush regions as one class-index mask.

    ``mask`` is (height, width) uint8 with class indices of the class map. ``ignored_labels``
    lists label names that the class map does not know (their regions were skipped), in
    order of first appearance. ``region_count`` counts the regions that were painted.
    """

    mask: npt.NDArray[np.uint8]
    ignored_labels: tuple[str, ...]
    region_count: int


def mask_to_results(
    mask: npt.ArrayLike,
    config: LabelConfig,
    class_map: ClassMap,
    scores: Mapping[str, SupportsFloat] | None = None,
) -> list[dict[str, Any]]:
    """Label Studio ``brushlabels`` results for a (height, width) class-index mask.

    One region per label present, in class order. A region's ``id`` is derived from the tag
    pair and the label, so re-predicting a task gives the same ids. ``scores`` maps label
    names to a per-region score (omitted for labels not in it). A label that the class map
    has but the project's config lacks is skipped with a warning: Label Studio could not
    show it.
    """
    classes = np.asarray(mask)
    if classes.ndim != 2 or classes.size == 0:
        raise InvalidInput(f"class mask must be a non-empty 2-D (height, width) array, got shape {classes.shape}")
    if classes.dtype.kind not in "iu":
        raise InvalidInput(f"class mask must hold integer class indices, got dtype {classes.dtype}")
    region_scores = _check_scores(scores, class_map)
    low, high = int(classes.min()), int(classes.max())
    if low < 0 or high > len(class_map.labels):
        bad = low if low < 0 else high
        raise UnknownLabel(f"class mask holds index {bad}, but the class map has indices 0..{len(class_map.labels)}")
    height, width = classes.shape
    present = np.flatnonzero(np.bincount(classes.ravel(), minlength=class_map.num_classes)[1:]) + 1
    results: list[dict[str, Any]] = []
    for index in present.tolist():
        name = class_map.name_of(index)
        if name not in config.labels:
            logger.warning("label %r is not in the project's label config; its region is not sent", name)
            continue
        result: dict[str, Any] = {
            "id": _region_id(config, name),
            "from_name": config.from_name,
            "to_name": config.to_name,
            "type": RESULT_TYPE,
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(classes == index), "brushlabels": [name]},
            "readonly": False,
        }
        if name in region_scores:
            result["score"] = region_scores[name]
        results.append(result)
    return results


def results_to_mask(
    results: Sequence[Mapping[str, Any]],
    config: LabelConfig,
    class_map: ClassMap,
    height: int,
    width: int,
) -> DecodedAnnotation:
    """Merge an annotation's brush regions into one (height, width) class-index mask.

    Results of other types or other tags are skipped silently; regions whose labels the
    class map does not know are skipped with a warning and reported in ``ignored_labels``.
    A region of a different size than (height, width), or without a usable ``value``, raises
    :class:`InvalidInput`.
    """
    _check_size(height, width)
    if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
        raise InvalidInput(f"annotation results must be a list of objects, got {type(results).__name__}")
    painted: dict[int, npt.NDArray[np.bool_]] = {}
    ignored: dict[str, None] = {}  # ordered set
    region_count = 0
    for position, result in enumerate(results):
        if not isinstance(result, Mapping):
            raise InvalidInput(f"result #{position} is not an object")
        kind = result.get("type")
        if not isinstance(kind, str) or kind.lower() != RESULT_TYPE:
            continue
        if result.get("from_name") != config.from_name or result.get("to_name") != config.to_name:
            continue
        where = f"result #{position} (id {result.get('id')!r})"
        rle, labels = _region_value(result, where)
        size = (_dimension(result, "original_height", where), _dimension(result, "original_width", where))
        if size != (height, width):
            raise InvalidInput(
                f"{where} is {size[1]}x{size[0]} but the image is {width}x{height} (width x height); "
                "brush regions must cover the whole image at its natural size"
            )
        known = [class_map.index_of(label) for label in labels if label in class_map.labels]
        for label in labels:
            if label not in class_map.labels and label not in ignored:
                logger.warning("ignoring brush regions with unknown label %r", label)
                ignored[label] = None
        if not known:
            continue
        try:
            region = rle_to_mask(rle, height, width, threshold=ALPHA_THRESHOLD)
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: {exc.message}") from exc
        for index in known:
            if index in painted:
                painted[index] |= region
            else:
                painted[index] = region.copy()
        region_count += 1
    mask = np.zeros((height, width), dtype=np.uint8)
    for index in sorted(painted):  # higher class index wins where labels overlap
        mask[painted[index]] = index
    return DecodedAnnotation(mask=mask, ignored_labels=tuple(ignored), region_count=region_count)


def image_size_from_results(results: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
    """(height, width) of the image the results refer to, or None when none states it.

    Every result that carries ``original_width``/``original_height`` must agree; otherwise
    :class:`InvalidInput` (a project with several differently sized images per task is not
    supported here).
    """
    if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
        raise InvalidInput(f"annotation results must be a list of objects, got {type(results).__name__}")
    found: tuple[int, int] | None = None
    for position, result in enumerate(results):
        if not isinstance(result, Mapping):
            raise InvalidInput(f"result #{position} is not an object")
        if "original_width" not in result and "original_height" not in result:
            continue
        where = f"result #{position} (id {result.get('id')!r})"
        size = (_dimension(result, "original_height", where), _dimension(result, "original_width", where))
        if found is None:
            found = size
        elif size != found:
            raise InvalidInput(f"results disagree on the image size: {found} and {size} (height, width)")
    return found


def _region_id(config: LabelConfig, label: str) -> str:
    """A stable, opaque 10-character region id for (brush tag, image tag, label)."""
    key = f"{config.from_name}\x1f{config.to_name}\x1f{label}".encode()
    return hashlib.sha1(key, usedforsecurity=False).hexdigest()[:10]


def _check_scores(scores: Mapping[str, SupportsFloat] | None, class_map: ClassMap) -> dict[str, float]:
    if scores is None:
        return {}
    checked: dict[str, float] = {}
    for name, score in scores.items():
        if name not in class_map.labels:
            raise UnknownLabel(f"score given for unknown label {name!r}; known labels: {', '.join(class_map.labels)}")
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise InvalidInput(f"score for {name!r} is not a number: {score!r}") from None
        if not math.isfinite(value):
            raise InvalidInput(f"score for {name!r} must be finite, got {value}")
        checked[name] = value
    return checked


def _region_value(result: Mapping[str, Any], where: str) -> tuple[Any, list[str]]:
    value = result.get("value")
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{where} has no 'value' object")
    if value.get("format", "rle") != "rle":
        raise InvalidInput(f"{where} has brush format {value.get('format')!r}; only 'rle' is supported")
    rle = value.get("rle")
    if rle is None:
        raise InvalidInput(f"{where} has no 'value.rle'")
    labels = value.get(RESULT_TYPE)
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise InvalidInput(f"{where} needs 'value.brushlabels' as a non-empty list of label names")
    return rle, labels


def _dimension(result: Mapping[str, Any], key: str, where: str) -> int:
    raw = result.get(key)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw <= 0:
        raise InvalidInput(f"{where} needs '{key}' as a positive integer, got {raw!r}")
    if isinstance(raw, float) and not raw.is_integer():
        raise InvalidInput(f"{where} needs '{key}' as a positive integer, got {raw!r}")
    return int(raw)


def _check_size(height: int, width: int) -> None:
    for side in (height, width):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side <= 0:
            raise InvalidInput(f"image size must be positive integers, got height={height!r} width={width!r}")

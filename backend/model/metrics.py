"""Segmentation metrics, pure numpy: confusion matrix, per-class IoU/Dice, means, pixel accuracy.

Definitions (``evaluate``/bench output use these names):

- Per-class IoU and Dice are **pooled** over the whole evaluation set: one confusion matrix summed
  over every pixel of every image (the mmsegmentation convention), so large and small frames weigh
  by their pixels. A class absent from both ground truth and prediction everywhere scores 1.
- ``mIoU`` / ``mDice``: mean over the **foreground** classes (background excluded). This is the
  headline we track ("foreground mDice").
- ``mIoU_with_background`` / ``mDice_with_background``: mean over all classes including
  background, the mmsegmentation-style mean many papers report. The study this product follows
  (mIoU 0.672, mDice 0.776, accuracy 99.3%) does not say which it used; we report both.
- ``accuracy``: pixel accuracy over all pixels (background included, which is why it is high).
- Per-image Dice: each image, each foreground class on its own; an empty prediction on an empty
  ground truth is correct (Dice 1), a non-empty prediction on an empty ground truth scores 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


def confusion_matrix(pred: NDArray[Any], target: NDArray[Any], num_classes: int) -> NDArray[Any]:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    t = target.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    if t.size and (t.min() < 0 or t.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"class index outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(cm: NDArray[Any]) -> NDArray[Any]:
    """IoU of each class from a confusion matrix; 1.0 where the class appears nowhere."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    return np.where(denom > 0, tp / np.maximum(denom, 1), 1.0)


def dice_per_class(cm: NDArray[Any]) -> NDArray[Any]:
    """Dice of each class from a confusion matrix; 1.0 where the class appears nowhere."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)


def pixel_accuracy(cm: NDArray[Any]) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 1.0


def image_dice(pred: NDArray[Any], target: NDArray[Any], cls: int) -> float:
    """Dice of one class on one image; 1.0 when both are empty."""
    p, t = pred == cls, target == cls
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


@dataclass(frozen=True)
class ClassScores:
    name: str
    iou: float
    dice: float
    image_dice_mean: float
    image_dice_median: float
    image_dice_p10: float


@dataclass(frozen=True)
class SegmentationReport:
    """Everything ``sonoseg model evaluate`` prints; see the module docstring for definitions."""

    mIoU: float
    mDice: float
    mIoU_with_background: float
    mDice_with_background: float
    accuracy: float
    per_class: tuple[ClassScores, ...]
    background: ClassScores
    n_images: int
    per_image_dice: tuple[tuple[float, ...], ...]  # [image][foreground class]

    def to_dict(self) -> dict[str, object]:
        def cls_dict(c: ClassScores) -> dict[str, object]:
            return {
                "iou": c.iou,
                "dice": c.dice,
                "image_dice_mean": c.image_dice_mean,
                "image_dice_median": c.image_dice_median,
                "image_dice_p10": c.image_dice_p10,
            }

        return {
            "mIoU": self.mIoU,
            "mDice": self.mDice,
            "mIoU_with_background": self.mIoU_with_background,
            "mDice_with_background": self.mDice_with_background,
            "accuracy": self.accuracy,
            "n_images": self.n_images,
            "per_class": {c.name: cls_dict(c) for c in self.per_class},
            "background": cls_dict(self.background),
        }


def evaluate_masks(
    preds: Iterable[NDArray[Any]], targets: Iterable[NDArray[Any]], class_names: Sequence[str]
) -> SegmentationReport:
    """Score predicted class maps against ground truth; ``class_names[0]`` is background."""
    k = len(class_names)
    if k < 2:
        raise ValueError("need background plus at least one class")
    cm = np.zeros((k, k), np.int64)
    per_image: list[tuple[float, ...]] = []
    for pred, target in zip(preds, targets, strict=True):
        cm += confusion_matrix(pred, target, k)
        per_image.append(tuple(image_dice(pred, target, c) for c in range(k)))
    if not per_image:
        raise ValueError("no images to evaluate")
    iou, dice = iou_per_class(cm), dice_per_class(cm)
    dist = np.array(per_image, dtype=np.float64)

    def scores(c: int) -> ClassScores:
        col = dist[:, c]
        return ClassScores(
            name=class_names[c],
            iou=float(iou[c]),
            dice=float(dice[c]),
            image_dice_mean=float(np.mean(col)),
            image_dice_median=float(np.median(col)),
            image_dice_p10=float(np.percentile(col, 10)),
        )

    return SegmentationReport(
        mIoU=float(iou[1:].mean()),
        mDice=float(dice[1:].mean()),
        mIoU_with_background=float(iou.mean()),
        mDice_with_background=float(dice.mean()),
        accuracy=pixel_accuracy(cm),
        per_class=tuple(scores(c) for c in range(1, k)),
        background=scores(0),
        n_images=len(per_image),
        per_image_dice=tuple(row[1:] for row in per_image),
    )

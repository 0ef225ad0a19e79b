"""Metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from backend.model.metrics import (
    confusion_matrix,
    dice_per_class,
    evaluate_masks,
    image_dice,
    iou_per_class,
    pixel_accuracy,
)

NAMES = ("background", "Nerve", "Vessel")


def test_confusion_matrix_counts_truth_rows_prediction_columns() -> None:
    target = np.array([[0, 1], [1, 2]])
    pred = np.array([[0, 1], [0, 1]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]


def test_iou_dice_accuracy_by_hand() -> None:
    # class 1: truth 4 px, prediction 6 px, overlap 3 -> IoU 3/7, Dice 6/10
    target = np.zeros((4, 4), int)
    target[0, :4] = 1
    pred = np.zeros((4, 4), int)
    pred[0, 1:4] = 1
    pred[1, 0:3] = 1
    cm = confusion_matrix(pred, target, 2)
    assert iou_per_class(cm)[1] == pytest.approx(3 / 7)
    assert dice_per_class(cm)[1] == pytest.approx(6 / 10)
    # background: truth 12, prediction 10, overlap 9 -> IoU 9/13, Dice 18/22
    assert iou_per_class(cm)[0] == pytest.approx(9 / 13)
    assert dice_per_class(cm)[0] == pytest.approx(18 / 22)
    assert pixel_accuracy(cm) == pytest.approx(12 / 16)


def test_empty_prediction_on_empty_truth_is_perfect() -> None:
    empty = np.zeros((3, 3), int)
    assert image_dice(empty, empty, 1) == 1.0
    assert image_dice(np.eye(3, dtype=int), empty, 1) == 0.0
    report = evaluate_masks([empty], [empty], NAMES)
    assert report.mDice == 1.0 and report.mIoU == 1.0 and report.accuracy == 1.0


def test_report_pools_pixels_and_keeps_per_image_distribution() -> None:
    t1 = np.zeros((4, 4), int)
    t1[:2, :2] = 1  # 4 px nerve
    p1 = t1.copy()  # perfect
    t2 = np.zeros((4, 4), int)
    t2[2:, 2:] = 2  # 4 px vessel
    p2 = np.zeros((4, 4), int)
    p2[2:, 3] = 2  # 2 px, both correct -> Dice 4/6
    report = evaluate_masks([p1, p2], [t1, t2], NAMES)
    nerve, vessel = report.per_class
    assert nerve.dice == 1.0
    assert vessel.dice == pytest.approx(4 / 6)
    assert vessel.iou == pytest.approx(2 / 4)
    assert report.mDice == pytest.approx((1 + 4 / 6) / 2)
    assert report.mIoU == pytest.approx((1 + 0.5) / 2)
    # background: truth 24, prediction 26, overlap 24 -> Dice 48/50, IoU 24/26
    assert report.mDice_with_background == pytest.approx((48 / 50 + 1 + 4 / 6) / 3)
    assert report.mIoU_with_background == pytest.approx((24 / 26 + 1 + 0.5) / 3)
    assert report.accuracy == pytest.approx(30 / 32)
    # per image: nerve is absent from image 2 in both -> Dice 1 there; vessel absent from image 1.
    assert report.per_image_dice == ((1.0, 1.0), (1.0, pytest.approx(4 / 6)))
    assert vessel.image_dice_mean == pytest.approx((1 + 4 / 6) / 2)
    d = report.to_dict()
    assert set(d) >= {"mIoU", "mDice", "accuracy", "per_class"} and set(d["per_class"]) == {"Nerve", "Vessel"}


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2), int), 2)

"""The promotion gate: pure decisions on two evaluations of the same validation labels."""

from __future__ import annotations

import math

import pytest

from backend.errors import InvalidInput
from backend.services.gate import Evaluation, TrainingEvidence, decide, gate_metrics

VAL = (11, 12, 13)


def ev(uid: str, dice: float, ids: tuple[int, ...] = VAL, **extra: float) -> Evaluation:
    return Evaluation(uid, ids, {"fg_mDice": dice, "fg_mIoU": dice * 0.8, "fg_image_dice": dice, **extra})


def test_worse_candidate_is_not_promoted_and_says_why() -> None:
    d = decide(ev("new", 0.70), ev("old", 0.75))
    assert not d.promote
    assert "0.7000 < serving old 0.7500" in d.reason and "kept as a candidate" in d.reason
    assert (d.candidate_score, d.serving_score) == (0.70, 0.75)


def test_equal_or_better_candidate_is_promoted() -> None:
    assert decide(ev("new", 0.75), ev("old", 0.75)).promote
    assert decide(ev("new", 0.80), ev("old", 0.75)).promote


def test_margin_demands_improvement_or_tolerates_a_loss() -> None:
    assert not decide(ev("new", 0.76), ev("old", 0.75), margin=0.02).promote
    assert decide(ev("new", 0.78), ev("old", 0.75), margin=0.02).promote
    assert decide(ev("new", 0.74), ev("old", 0.75), margin=-0.02).promote
    assert not decide(ev("new", 0.72), ev("old", 0.75), margin=-0.02).promote


def test_metric_is_configurable() -> None:
    cand = Evaluation("new", VAL, {"fg_mDice": 0.9, "fg_mIoU": 0.5, "fg_image_dice": 0.9})
    serv = Evaluation("old", VAL, {"fg_mDice": 0.8, "fg_mIoU": 0.6, "fg_image_dice": 0.8})
    assert decide(cand, serv, metric="fg_mDice").promote
    assert not decide(cand, serv, metric="fg_mIoU").promote
    with pytest.raises(InvalidInput, match="gate metric"):
        decide(cand, serv, metric="accuracy")


def test_different_validation_labels_are_refused_not_compared() -> None:
    with pytest.raises(InvalidInput, match="same validation labels"):
        decide(ev("new", 0.9, ids=(11, 12)), ev("old", 0.1))
    with pytest.raises(InvalidInput, match="same validation labels"):
        decide(ev("new", 0.9, ids=(11, 12, 14)), ev("old", 0.1))


def test_first_model_is_promoted_without_comparison() -> None:
    d = decide(ev("new", 0.3), None, evidence=TrainingEvidence(frames_seen=40, n_train=20), min_first_score=0.05)
    assert d.promote and "no serving model" in d.reason and d.candidate_score == 0.3


def test_first_model_needs_a_full_epoch() -> None:
    """A run whose budget went on loading data (0 epochs) once went to serving."""
    d = decide(ev("new", 0.9), None, evidence=TrainingEvidence(frames_seen=19, n_train=20))
    assert not d.promote and "less than one full epoch" in d.reason and "kept as a candidate" in d.reason
    assert not decide(ev("new", 0.9), None, evidence=TrainingEvidence(frames_seen=0, n_train=0)).promote
    assert decide(ev("new", 0.9), None, evidence=TrainingEvidence(frames_seen=20, n_train=20)).promote


def test_first_model_needs_validation_evidence_above_the_floor() -> None:
    enough = TrainingEvidence(frames_seen=100, n_train=10)
    assert not decide(None, None, evidence=enough).promote
    assert "no labelled validation image" in decide(None, None, evidence=enough).reason
    low = decide(ev("new", 0.04), None, evidence=enough, min_first_score=0.05)
    assert not low.promote and "below the floor 0.05" in low.reason and low.candidate_score == 0.04
    assert not decide(ev("new", float("nan")), None, evidence=enough).promote
    assert decide(ev("new", 0.05), None, evidence=enough, min_first_score=0.05).promote


def test_no_validation_labels_with_a_serving_model_promotes_nothing() -> None:
    d = decide(ev("new", 0.9, ids=()), ev("old", 0.1, ids=()))
    assert not d.promote and "promote by hand" in d.reason
    assert not decide(None, ev("old", 0.1)).promote


def test_nan_candidate_never_promotes_and_nan_serving_never_blocks() -> None:
    assert not decide(ev("new", math.nan), ev("old", 0.5)).promote
    assert decide(ev("new", 0.5), ev("old", math.nan)).promote


def test_gate_metrics_from_engine_values() -> None:
    m = gate_metrics(0.6, 0.4, [(1.0, 0.5), (0.0, 0.5)])
    assert m == {"fg_mDice": 0.6, "fg_mIoU": 0.4, "fg_image_dice": pytest.approx(0.5)}
    assert math.isnan(gate_metrics(0.6, 0.4, [])["fg_image_dice"])

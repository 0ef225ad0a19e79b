"""The promotion gate: a candidate serves only if it is at least as good as the serving model.

Pure values in, a decision out: no session, no store, no clock. Both models must have been scored
on the SAME validation images with the SAME label versions (:class:`Evaluation` carries the mask
version ids it was scored against); comparing numbers from different image sets would let a lucky
split promote a worse model, so a mismatch is refused instead of decided.

The rule, with ``m`` the gate metric (higher is better) and ``margin`` from settings:
promote iff ``m(candidate) >= m(serving) + margin``. A margin of 0 means "at least as good"; a
positive margin demands a real improvement; a negative one tolerates a small loss (for example to
prefer a model trained on more, fresher labels). With a serving model but no labelled validation
image there is no evidence, so nothing is promoted automatically.

The first model has a floor instead (a model trained for 0 epochs once went to serving as "first
model: no serving model to compare with"): it must have seen every training frame at least once
(one full epoch) and score at least ``min_first_score`` (settings.gate_min_dice, default 0.05)
on labelled validation images. An untrained network's random masks are worse than the empty
pre-annotations served before any model exists: sonographers would have to erase them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.errors import InvalidInput

GATE_METRICS = ("fg_mDice", "fg_mIoU", "fg_image_dice")
"""Metrics the gate can compare, all in [0, 1], higher is better:
``fg_mDice``/``fg_mIoU``: pooled over all validation pixels, mean over the foreground classes
(the engine's ``mDice``/``mIoU``); ``fg_image_dice``: mean over images of the mean per-image
foreground Dice (weighs small structures and small frames more)."""


@dataclass(frozen=True)
class Evaluation:
    """One model scored on one validation set.

    ``mask_version_ids`` are the label versions (one per image, in image order) the scores were
    computed against; ``metrics`` holds at least the :data:`GATE_METRICS` keys (see
    :func:`gate_metrics`).
    """

    model_uid: str
    mask_version_ids: tuple[int, ...]
    metrics: Mapping[str, float]
    report: Mapping[str, Any] | None = None  # the engine's full report (per class), kept with the version

    @property
    def n_images(self) -> int:
        return len(self.mask_version_ids)


@dataclass(frozen=True)
class TrainingEvidence:
    """How much a candidate trained: frames it was shown (steps x batch) and the training set size."""

    frames_seen: int
    n_train: int

    @property
    def full_epoch(self) -> bool:
        return self.n_train > 0 and self.frames_seen >= self.n_train


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    metric: str
    candidate_score: float | None
    serving_score: float | None


def gate_metrics(mDice: float, mIoU: float, per_image_foreground_dice: Sequence[Sequence[float]]) -> dict[str, float]:
    """The gate's metric keys from the engine's report values (pooled mDice/mIoU, [image][class] Dice)."""
    per_image = [float(np.mean(row)) for row in per_image_foreground_dice if len(row)]
    return {
        "fg_mDice": float(mDice),
        "fg_mIoU": float(mIoU),
        "fg_image_dice": float(np.mean(per_image)) if per_image else float("nan"),
    }


def _first_model(
    candidate: Evaluation | None, metric: str, evidence: TrainingEvidence | None, min_score: float
) -> GateDecision:
    """The floor a first model must clear (see the module docstring)."""
    if evidence is not None and not evidence.full_epoch:
        return GateDecision(
            False,
            f"first model not promoted: it saw {evidence.frames_seen} frames, less than one full epoch over the "
            f"{evidence.n_train} training images (raise the training budget); kept as a candidate",
            metric,
            None,
            None,
        )
    if candidate is None or candidate.n_images == 0:
        return GateDecision(
            False,
            "first model not promoted: no labelled validation image to check it against; label validation "
            "images or promote by hand (`sonoseg models promote`); kept as a candidate",
            metric,
            None,
            None,
        )
    score = _score(candidate, metric)
    if not math.isfinite(score) or score < min_score:
        return GateDecision(
            False,
            f"first model not promoted: {metric} {score:.4f} on {candidate.n_images} validation images is below "
            f"the floor {min_score:g} (SONOSEG_GATE_MIN_DICE); kept as a candidate",
            metric,
            score,
            None,
        )
    return GateDecision(
        True,
        f"first model: no serving model to compare with; {metric} {score:.4f} >= floor {min_score:g} "
        f"on {candidate.n_images} validation images",
        metric,
        score,
        None,
    )


def _score(evaluation: Evaluation, metric: str) -> float:
    value = evaluation.metrics.get(metric)
    if value is None:
        raise InvalidInput(f"evaluation of {evaluation.model_uid} has no metric {metric!r}")
    return float(value)


def decide(
    candidate: Evaluation | None,
    serving: Evaluation | None,
    *,
    metric: str = "fg_mDice",
    margin: float = 0.0,
    evidence: TrainingEvidence | None = None,
    min_first_score: float = 0.0,
) -> GateDecision:
    """Promote the candidate or not, and say why (the reason is stored on the model version).

    ``candidate`` is None when there was nothing to evaluate on (no labelled validation image);
    ``serving`` is None when the project has no serving model.
    """
    if metric not in GATE_METRICS:
        raise InvalidInput(f"gate metric must be one of {', '.join(GATE_METRICS)}, not {metric!r}")
    if not math.isfinite(margin):
        raise InvalidInput(f"gate margin must be a finite number, got {margin}")
    if serving is None:
        return _first_model(candidate, metric, evidence, min_first_score)
    if candidate is None or candidate.n_images == 0:
        return GateDecision(
            False,
            "no labelled validation image to compare against the serving model; "
            "label some validation images or promote by hand (`sonoseg models promote`)",
            metric,
            None,
            None,
        )
    if candidate.mask_version_ids != serving.mask_version_ids:
        raise InvalidInput(
            f"the gate needs both models scored on the same validation labels: candidate {candidate.model_uid} "
            f"used {candidate.n_images}, serving {serving.model_uid} used {serving.n_images} (or other versions)"
        )
    cand, serv = _score(candidate, metric), _score(serving, metric)
    if not math.isfinite(cand):
        return GateDecision(False, f"candidate {metric} is not a number", metric, cand, serv)
    if not math.isfinite(serv) or cand >= serv + margin:
        verdict = "at least as good as" if margin <= 0 else f"better by >= {margin:g} than"
        return GateDecision(
            True,
            f"{metric} {cand:.4f} {verdict} serving {serving.model_uid} ({serv:.4f}) "
            f"on {candidate.n_images} validation images",
            metric,
            cand,
            serv,
        )
    return GateDecision(
        False,
        f"{metric} {cand:.4f} < serving {serving.model_uid} {serv:.4f}"
        + (f" + margin {margin:g}" if margin else "")
        + f" on {candidate.n_images} validation images: kept as a candidate",
        metric,
        cand,
        serv,
    )

"""The promotion gate: a candidate serves only if it is at least as good as the serving model.

Pure values in, a decision out: no session, no store, no clock. Both models must have been scored
on the SAME validation images with the SAME label versions (:class:`Evaluation` carries the mask
version ids it was scored against); comparing numbers from different image sets would let a lucky
split promote a worse model, so a mismatch is refused instead of decided.

The rule, with ``m`` the gate metric (higher is better) and ``margin`` from settings:
promote iff ``m(candidate) >= m(serving) + margin``. A margin of 0 means "at least as good"; a
positive margin demands a real improvement; a negative one tolerates a small loss (for example to
prefer a model trained on more, fresher labels). With no serving model the first candidate is
promoted: anything beats serving empty pre-annotations. With a serving model but no labelled
validation image there is no evidence, so nothing is promoted automatically.
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
class GateDecision:
    promote: bool
    reason: str
    metric: str
    candidate_score: float | None
    serving_score: float | None


def gate_metrics(
    mDice: float, mIoU: float, per_image_foreground_dice: Sequence[Sequence[float]]
) -> dict[str, float]:
    """The gate's metric keys from the engine's report values (pooled mDice/mIoU, [image][class] Dice)."""
    per_image = [float(np.mean(row)) for row in per_image_foreground_dice if len(row)]
    return {
        "fg_mDice": float(mDice),
        "fg_mIoU": float(mIoU),
        "fg_image_dice": float(np.mean(per_image)) if per_image else float("nan"),
    }


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
        reason = "first model: no serving model to compare with"
        if candidate is None or candidate.n_images == 0:
            return GateDecision(True, reason, metric, None, None)
        score = _score(candidate, metric)
        return GateDecision(True, f"{reason} ({metric} {score:.4f} on {candidate.n_images} validation images)",
                            metric, score, None)
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

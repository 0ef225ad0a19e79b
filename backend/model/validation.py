"""Per-epoch validation: pooled foreground Dice on held-out cases, on the network grid.

Validation runs on the preprocessed (resampled) cases rather than natural-size frames: it ranks
epochs, so it only has to be consistent and cheap. The final, natural-size numbers come from
``sonoseg model evaluate`` / :func:`backend.model.metrics.evaluate_masks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from backend.model.data import Case
from backend.model.inference import class_argmax, predict_probabilities
from backend.model.metrics import confusion_matrix, dice_per_class
from backend.model.spec import ModelSpec


class Validator:
    """``validator(model) -> per-foreground-class Dice`` (empty array when there are no cases)."""

    def __init__(self, cases: Sequence[Case], spec: ModelSpec, device: torch.device, *, mixed_precision: bool) -> None:
        self.cases = cases
        self.spec = spec
        self.device = device
        self.mixed_precision = mixed_precision

    def __call__(self, model: nn.Module) -> NDArray[Any]:
        if not self.cases:
            return np.zeros(0)
        k = self.spec.num_classes
        cm = np.zeros((k, k), np.int64)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for case in self.cases:
                    x = torch.from_numpy(case.image)[None, None].to(self.device)
                    probs = predict_probabilities(model, x, self.spec, mixed_precision=self.mixed_precision)[0]
                    pred = class_argmax(probs, 0).cpu().numpy()
                    cm += confusion_matrix(pred, case.mask, k)
        finally:
            model.train(was_training)
        return dice_per_class(cm)[1:]


class ValidationSchedule:
    """When to validate, so that validation costs at most ``fraction`` of the run's wall clock, and
    the smoothed score the best epoch is chosen on.

    Validation used to run on every held-out frame after every epoch: on 392 frames it took ~70%
    of a 25-minute budget, and the best epoch was picked on a score that jumped by 0.2 between
    epochs. Now the first epoch is always validated (that measures the cost); after that an epoch
    is validated only if the time spent validating, this evaluation included, stays within
    ``fraction`` of the elapsed time. The score offered to the best-keeper is an exponential
    moving average (weight ``alpha`` on the newest evaluation), so one lucky evaluation cannot win.
    """

    def __init__(self, fraction: float, alpha: float, *, final_evaluations: float = 0.0) -> None:
        """``final_evaluations``: what the run will still spend after the loop, in units of one
        evaluation (the forced evaluation of the last epoch plus the final re-score on every
        held-out frame), reserved from the share so the whole run stays within it."""
        self.fraction = fraction
        self.alpha = alpha
        self.final_evaluations = final_evaluations
        self.spent = 0.0
        self.evaluations = 0
        self.smoothed: float | None = None

    def due(self, elapsed: float) -> bool:
        if self.evaluations == 0:
            return True
        cost = self.spent / self.evaluations
        reserve = cost * self.final_evaluations
        return self.spent + cost + reserve <= self.fraction * (elapsed + cost + reserve)

    def record(self, score: float, seconds: float) -> float:
        """Account one evaluation; returns the smoothed score."""
        self.spent += seconds
        self.evaluations += 1
        self.smoothed = score if self.smoothed is None else self.alpha * score + (1 - self.alpha) * self.smoothed
        return self.smoothed


def validation_sample(n: int, size: int, seed: int) -> list[int]:
    """A fixed, seeded sample of ``size`` of ``n`` held-out cases (all of them when fewer)."""
    if n <= size:
        return list(range(n))
    return sorted(np.random.default_rng(seed + 1).choice(n, size=size, replace=False).tolist())


class TrainDiceMeter:
    """nnU-Net-style pseudo Dice over the training batches of one epoch (argmax of the top head)."""

    def __init__(self, num_classes: int) -> None:
        self.k = num_classes
        self.tp = np.zeros(num_classes - 1)
        self.fp = np.zeros(num_classes - 1)
        self.fn = np.zeros(num_classes - 1)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = class_argmax(logits.detach(), 1)
        for c in range(1, self.k):
            p, t = pred == c, target == c
            self.tp[c - 1] += float((p & t).sum())
            self.fp[c - 1] += float((p & ~t).sum())
            self.fn[c - 1] += float((~p & t).sum())

    def dice(self) -> NDArray[Any]:
        denom = 2 * self.tp + self.fp + self.fn
        return np.where(denom > 0, 2 * self.tp / np.maximum(denom, 1), 1.0)

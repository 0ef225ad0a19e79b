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
from backend.model.inference import predict_probabilities
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
                    pred = (
                        predict_probabilities(model, x, self.spec, mixed_precision=self.mixed_precision)[0]
                        .argmax(0)
                        .cpu()
                        .numpy()
                    )
                    cm += confusion_matrix(pred, case.mask, k)
        finally:
            model.train(was_training)
        return dice_per_class(cm)[1:]


class TrainDiceMeter:
    """nnU-Net-style pseudo Dice over the training batches of one epoch (argmax of the top head)."""

    def __init__(self, num_classes: int) -> None:
        self.k = num_classes
        self.tp = np.zeros(num_classes - 1)
        self.fp = np.zeros(num_classes - 1)
        self.fn = np.zeros(num_classes - 1)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits.detach().argmax(1)
        for c in range(1, self.k):
            p, t = pred == c, target == c
            self.tp[c - 1] += float((p & t).sum())
            self.fp[c - 1] += float((p & ~t).sum())
            self.fn[c - 1] += float((~p & t).sum())

    def dice(self) -> NDArray[Any]:
        denom = 2 * self.tp + self.fp + self.fn
        return np.where(denom > 0, 2 * self.tp / np.maximum(denom, 1), 1.0)

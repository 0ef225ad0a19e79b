"""Optimiser construction, the poly learning-rate schedule, best-model keeping and stopping rules."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from backend.model.train_config import TrainConfig


def make_optimizer(config: TrainConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.learning_rate, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


@dataclass(frozen=True)
class PolySchedule:
    """lr = base * warm-up * (1 - progress) ** exponent, progress = max(step share, time share).

    ``warmup`` is the share of the run over which the rate first rises linearly from
    ``base * 1/total_steps`` to ``base`` (0: none, nnU-Net's schedule). A fine-tune starts with
    fresh optimiser moments on weights that already fit: AdamW's first, bias-corrected steps move
    every weight by about the full rate whatever its gradient, which throws a trained network far
    from where it was (the reason for a warm-up with Adam, Liu et al. 2020, "On the variance of the
    adaptive learning rate and beyond").
    """

    base_lr: float
    total_steps: int
    max_seconds: float | None
    exponent: float = 0.9
    warmup: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warm-up must be a share in [0, 1), not {self.warmup}")

    def progress(self, step: int, elapsed: float) -> float:
        frac = step / self.total_steps
        if self.max_seconds:
            frac = max(frac, elapsed / self.max_seconds)
        return min(max(frac, 0.0), 1.0)

    def lr(self, step: int, elapsed: float) -> float:
        progress = self.progress(step, elapsed)
        ramp = 1.0
        if self.warmup:
            ramp = min(1.0, max(progress, 1.0 / self.total_steps) / self.warmup)
        return float(self.base_lr * ramp * (1.0 - progress) ** self.exponent)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class StopPolicy:
    """Decides after each epoch (and the budget after each step) whether the run is over."""

    max_epochs: int
    max_seconds: float | None
    patience: int | None

    def out_of_time(self, elapsed: float) -> bool:
        return self.max_seconds is not None and elapsed >= self.max_seconds

    def after_epoch(self, epoch: int, elapsed: float, epochs_since_best: int) -> str | None:
        """The stop reason, or None to go on. ``epoch`` counts completed epochs."""
        if epoch >= self.max_epochs:
            return "epochs"
        if self.out_of_time(elapsed):
            return "time_budget"
        if self.patience is not None and epochs_since_best >= self.patience:
            return "early_stopping"
        return None


@dataclass
class BestKeeper:
    """Keeps a CPU copy of the weights with the best validation score, and counts epochs since."""

    min_improvement: float
    state: dict[str, torch.Tensor] | None = None
    score: float = -1.0
    epoch: int = 0
    since: int = 0

    def offer(self, score: float, epoch: int, model: torch.nn.Module) -> bool:
        """Record ``model`` if ``score`` beats the best by ``min_improvement``; True when it did."""
        if self.state is not None and score <= self.score + self.min_improvement:
            self.since += 1
            return False
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.score, self.epoch, self.since = score, epoch, 0
        return True

"""nnU-Net's training loss: cross-entropy + soft Dice, summed over deep-supervision heads.

Soft Dice is computed on softmax probabilities, over the whole batch at once ("batch Dice", the 2D
default in nnU-Net plans), foreground classes only, smooth 1e-5. We add ``1 - Dice`` (nnU-Net adds
``-Dice``): same gradients, but the logged loss stays non-negative. Deep-supervision weights are
1/2**i from the full-resolution head down, the lowest-resolution head gets 0, normalised to sum 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiceCELoss(nn.Module):
    """``loss(logits (B, C, H, W), target (B, H, W) long) -> scalar``."""

    def __init__(self, *, batch_dice: bool = True, include_background: bool = False, smooth: float = 1e-5) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        dice = soft_dice(logits.softmax(1), target, batch_dice=self.batch_dice, smooth=self.smooth)
        if not self.include_background:
            dice = dice[..., 1:]
        return ce + (1.0 - dice.mean())


def soft_dice(probs: torch.Tensor, target: torch.Tensor, *, batch_dice: bool, smooth: float) -> torch.Tensor:
    """Per-class soft Dice: shape (C,) with ``batch_dice``, else (B, C)."""
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    axes = (0, 2, 3) if batch_dice else (2, 3)
    tp = (probs * onehot).sum(axes)
    fp = (probs * (1 - onehot)).sum(axes)
    fn = ((1 - probs) * onehot).sum(axes)
    return (2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8)


def deep_supervision_weights(n_heads: int) -> list[float]:
    """nnU-Net's weights: 1/2**i, last (coarsest) head 0, normalised; [1.0] for a single head."""
    if n_heads == 1:
        return [1.0]
    raw = [1.0 / 2**i for i in range(n_heads)]
    raw[-1] = 0.0
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``base`` over heads; targets are nearest-downsampled to each head's size."""

    def __init__(self, base: nn.Module, n_heads: int) -> None:
        super().__init__()
        self.base = base
        self.weights = deep_supervision_weights(n_heads)

    def forward(self, outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if len(outputs) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} heads, got {len(outputs)}")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, out in zip(self.weights, outputs, strict=True):
            if weight == 0.0:
                continue
            total = total + weight * self.base(out, downsample_target(target, (out.shape[-2], out.shape[-1])))
        return total


def downsample_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) long class map -> (B, *size) by nearest neighbour."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()

"""Resampling between an image's natural pixel grid and the network's grid (``ModelSpec.input_scale``).

Images use box-filter averaging ("area") when shrinking, so speckle does not alias (and it is
~15x faster than antialiased bilinear on the CPU), bilinear when enlarging; masks are resampled through their one-hot encoding (bilinear, antialiased, then argmax), which keeps
thin structures better than nearest-neighbour when shrinking; probability maps use bilinear and are
renormalised to sum to 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from backend.model.inference import class_argmax


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) after scaling by ``scale``; never below 1 pixel."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, *size); area-averaged when shrinking, bilinear when enlarging."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    h, w = images.shape[-2:]
    if size[0] <= h and size[1] <= w:
        return F.interpolate(images, size=size, mode="area")
    mixed = size[0] < h or size[1] < w
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=mixed)


def resize_image(image: NDArray[Any], size: tuple[int, int]) -> NDArray[Any]:
    """(H, W) array -> float32 (*size)."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return resize_images(t, size)[0, 0].numpy()


def resize_mask(mask: NDArray[Any], size: tuple[int, int], num_classes: int) -> NDArray[Any]:
    """(H, W) integer class map -> int64 (*size) via one-hot resampling and argmax."""
    if tuple(mask.shape) == tuple(size):
        return mask.astype(np.int64, copy=False)
    onehot = F.one_hot(torch.from_numpy(mask.astype(np.int64)), num_classes).permute(2, 0, 1)[None].float()
    return class_argmax(resize_images(onehot, size)[0], 0).numpy()


def resize_probabilities(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) probabilities -> (B, C, *size), still summing to 1 over C."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    out = resize_images(probs, size).clamp_min_(0)
    return out / out.sum(dim=1, keepdim=True).clamp_min_(1e-8)

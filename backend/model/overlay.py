"""Rendering a mask over its frame for people to look at (CLI ``predict``, benches)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

# Overlay colours per foreground class (RGB), cycled when there are more classes.
CLASS_COLOURS = ((255, 215, 0), (220, 20, 60), (30, 144, 255), (50, 205, 50), (186, 85, 211), (255, 140, 0))


def overlay(frame: NDArray[Any], mask: NDArray[Any], alpha: float = 0.45) -> NDArray[Any]:
    """RGB uint8 (H, W, 3): the uint8 frame in grey, each class tinted and outlined in its colour."""
    if frame.shape != mask.shape:
        raise ValueError(f"frame {frame.shape} and mask {mask.shape} differ in shape")
    rgb = np.repeat(frame[..., None], 3, axis=-1).astype(np.float32)
    for cls in range(1, int(mask.max(initial=0)) + 1):
        region = mask == cls
        if not region.any():
            continue
        colour = np.array(CLASS_COLOURS[(cls - 1) % len(CLASS_COLOURS)], np.float32)
        rgb[region] = (1 - alpha) * rgb[region] + alpha * colour
        rgb[region & ~ndimage.binary_erosion(region)] = colour
    return np.clip(rgb, 0, 255).astype(np.uint8)

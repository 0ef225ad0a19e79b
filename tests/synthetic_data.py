"""Generated ultrasound-like frames for tests when the shared dataset is absent (or too big)."""

from __future__ import annotations

import numpy as np


def synthetic_frame(seed: int, size: tuple[int, int] = (96, 128)) -> tuple[np.ndarray, np.ndarray]:
    """A speckled grey frame with a bright elliptical 'nerve' (1) and a dark round 'vessel' (2)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = rng.gamma(2.0, 25.0, size=(h, w))
    mask = np.zeros((h, w), np.uint8)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.25, 0.45) * w
    nerve = ((yy - cy) / (0.12 * h)) ** 2 + ((xx - cx) / (0.10 * w)) ** 2 < 1
    vy, vx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.6, 0.8) * w
    vessel = ((yy - vy) ** 2 + (xx - vx) ** 2) < (0.08 * min(h, w)) ** 2
    img[nerve] += 90
    img[vessel] *= 0.15
    mask[nerve] = 1
    mask[vessel] = 2
    return np.clip(img, 0, 255).astype(np.uint8), mask

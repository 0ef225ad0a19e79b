"""Generated ultrasound-like frames with known masks, for tests, benches and demos without real data.

Each frame has speckle-like multiplicative noise on a depth-attenuated background; class 1 is a
bright textured ellipse (a nerve's honeycomb look), class 2 a dark round region (an anechoic
vessel), class k > 2 further bright ellipses. Deterministic for a given seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray


def make_blob_pairs(
    count: int,
    size: tuple[int, int] = (64, 64),
    n_foreground: int = 2,
    seed: int = 0,
    empty_every: int = 0,
) -> list[tuple[NDArray[Any], NDArray[Any]]]:
    """``count`` (uint8 image, int64 mask) pairs; every ``empty_every``-th frame has no foreground."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pairs: list[tuple[NDArray[Any], NDArray[Any]]] = []
    for i in range(count):
        depth = 1.0 - 0.5 * yy / h
        base = 70.0 * depth * rng.gamma(4.0, 0.25, size=(h, w))
        mask = np.zeros((h, w), np.int64)
        if not (empty_every and i % empty_every == empty_every - 1):
            for cls in range(1, n_foreground + 1):
                ry, rx = rng.uniform(0.08, 0.16) * h, rng.uniform(0.08, 0.18) * w
                cy, cx = rng.uniform(ry + 1, h - ry - 1), rng.uniform(rx + 1, w - rx - 1)
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
                inside &= mask == 0
                mask[inside] = cls
                if cls == 2:
                    base[inside] = 12.0 * rng.gamma(4.0, 0.25, size=int(inside.sum()))
                else:
                    base[inside] = 150.0 + 60.0 * rng.random(int(inside.sum()))
        image = np.clip(base, 0, 255).astype(np.uint8)
        pairs.append((image, mask))
    return pairs

"""Ultrasound-like frames with masks for tests: the one generator, PNG bytes, and the shared dataset.

:func:`synthetic_frame` is the only generator of test frames (seeded; any size). Where a test needs
the frames a tiny network learns within seconds, :func:`blob_pairs` hands out the model engine's own
``backend.model.synthetic.make_blob_pairs`` instead (a production generator, not a second test one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data" / "usgra-seg"  # as in tests/conftest.py


def synthetic_frame(seed: int, size: tuple[int, int] = (96, 128)) -> tuple[np.ndarray, np.ndarray]:
    """A speckled grey frame (uint8) and its mask (uint8 class ids): a bright elliptical 'nerve' (1)
    and a dark round 'vessel' (2).

    Both structures are present in every frame of 16 x 16 pixels or more, whatever the seed (the
    vessel is drawn over the nerve where they touch, never over its centre): tests rely on a mask
    holding classes 0, 1 and 2. About a sixth of the nerve's pixels are above 170 and nine tenths
    of the vessel's below 15 (the thresholds of :class:`tests.support.models.ThresholdModel`), so
    the stand-in model finds some of both.
    """
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


def blob_pairs(n: int, *, seed: int, size: tuple[int, int] = (128, 128)) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (image, uint8 mask) pairs from the model engine's blob generator: what a tiny network
    learns to find within seconds (the training end-to-end tests)."""
    from backend.model.synthetic import make_blob_pairs

    return [(image, mask.astype(np.uint8)) for image, mask in make_blob_pairs(n, size=size, seed=seed)]


def png_bytes(pixels: np.ndarray) -> bytes:
    """``pixels`` as a PNG file's bytes, encoded by sonoseg (``backend.imaging.io.encode_png``)."""
    from backend.imaging.io import encode_png

    return encode_png(pixels)


def dataset_pairs(n: int, *, offset: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``n`` (name, image, mask) training pairs: real usgra-seg images when present (never test/),
    otherwise 512 x 512 :func:`synthetic_frame` frames (the size the tiny serving model expects)."""
    if SHARED_DATA.is_dir():
        from backend.imaging.io import read_image, read_mask

        names = sorted(p.name for p in (SHARED_DATA / "images").glob("*.png"))[offset : offset + n]
        return [
            (name, read_image(SHARED_DATA / "images" / name)[0].pixels, read_mask(SHARED_DATA / "masks" / name))
            for name in names
        ]
    return [(f"gen{offset + i:04d}.png", *synthetic_frame(offset + i, (512, 512))) for i in range(n)]

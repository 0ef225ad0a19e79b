"""Brush RLE: our numpy codec against label-studio-sdk's reference, in one run.

    .venv/bin/python bench/bench_rle.py                  # ~15 s
    .venv/bin/python bench/bench_rle.py --masks DIR      # palette masks: 0 bg, 1 nerve, 2 vessel

Cases, all 512x512 (the size of the USG-RA masks):

* nerve: the first mask under ``--masks`` (sorted by name) that has nerve pixels, class 1 as a
  0/255 uint8 mask; a generated ellipse with a ragged edge when the folder is missing.
* noisy: the same mask with 5% of its pixels flipped (seeded), like an unthresholded,
  speckled prediction: many short runs, where the SDK's per-run Python work dominates.
* nerve x N: every nerve mask among the first 20, encoded/decoded back to back.

Encode is SDK ``mask2rle`` vs our ``mask_to_rle`` on the same 0/255 array; decode is SDK
``decode_rle`` vs our ``decode_rle`` on the same bytes. Both outputs are checked identical
before timing. A time is the best of up to 5 batches after a warm-up call (2 calls when one
takes over 0.3 s), per call. Ratios are SDK time / our time from this run. The machine may
be shared: the load average is printed with the table. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.labelstudio.rle import decode_rle, mask_to_rle

DEFAULT_MASKS = Path("/work/shared/data/usgra-seg/masks")
NERVE = 1
AGGREGATE_LIMIT = 20
NOISE_FRACTION = 0.05
T = TypeVar("T")


def best_time(fn: Callable[[], object]) -> float:
    """Seconds per call: best of up to 5 batches of ~50 ms after one warm-up call."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > 0.3:
        start = time.perf_counter()
        fn()
        return min(first, time.perf_counter() - start)
    number = max(1, int(0.05 / max(first, 1e-7)))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def each(fn: Callable[[T], object], items: Sequence[T]) -> Callable[[], None]:
    """A no-argument call of ``fn`` on every item, for timing."""

    def run() -> None:
        for item in items:
            fn(item)

    return run


def ragged_ellipse(size: int = 512, seed: int = 0) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    radius = ((yy - 300) / 40.0) ** 2 + ((xx - 260) / 70.0) ** 2
    mask: npt.NDArray[np.uint8] = ((radius + rng.normal(0, 0.15, (size, size)) < 1.0) * 255).astype(np.uint8)
    return mask


def load_nerve_masks(folder: Path) -> list[tuple[str, npt.NDArray[np.uint8]]]:
    if not folder.is_dir():
        return []
    from PIL import (
        Image,  # the SDK depends on Pillow, so it is here whenever the SDK is
    )

    masks = []
    for path in sorted(folder.glob("*.png"))[:AGGREGATE_LIMIT]:
        nerve = (np.array(Image.open(path)) == NERVE).astype(np.uint8) * 255
        if nerve.any():
            masks.append((path.name, nerve))
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=Path, default=DEFAULT_MASKS, help="folder of palette PNG masks")
    args = parser.parse_args()
    from label_studio_sdk.converter import brush  # the reference (a dev dependency)

    sdk_encode: Callable[[npt.NDArray[np.uint8]], list[int]] = brush.mask2rle
    sdk_decode: Callable[[list[int]], npt.NDArray[np.uint8]] = brush.decode_rle

    real = load_nerve_masks(args.masks)
    if real:
        name, nerve = real[0]
        source = f"{args.masks}/{name}"
    else:
        nerve, source = ragged_ellipse(), "generated ragged ellipse (no mask folder)"
        real = [("generated", nerve)]
    flips = np.random.default_rng(0).random(nerve.shape) < NOISE_FRACTION
    noisy = np.where(flips, 255 - nerve, nerve).astype(np.uint8)
    group = [mask for _, mask in real]

    print(f"nerve mask: {source}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for label, masks in (("nerve", [nerve]), ("noisy (5% flipped)", [noisy]), (f"nerve x {len(group)}", group)):
        streams = [mask_to_rle(mask) for mask in masks]
        for mask, stream in zip(masks, streams, strict=True):
            if stream != list(sdk_encode(mask)):
                raise SystemExit(f"{label}: our bytes differ from the SDK's")
            if not np.array_equal(decode_rle(stream), sdk_decode(stream)):
                raise SystemExit(f"{label}: our decoding differs from the SDK's")
        sdk_enc = best_time(each(sdk_encode, masks))
        our_enc = best_time(each(mask_to_rle, masks))
        sdk_dec = best_time(each(sdk_decode, streams))
        our_dec = best_time(each(decode_rle, streams))
        rows.append((label, sum(map(len, streams)), sdk_enc, our_enc, sdk_dec, our_dec))

    print("\nidentical bytes and words: yes (checked for every mask)\n")
    header = f"{'case':<20}{'RLE bytes':>10}{'enc SDK ms':>12}{'enc ours ms':>13}{'x':>7}"
    header += f"{'dec SDK ms':>12}{'dec ours ms':>13}{'x':>7}"
    print(header)
    print("-" * len(header))
    for label, size, sdk_enc, our_enc, sdk_dec, our_dec in rows:
        print(
            f"{label:<20}{size:>10}{sdk_enc * 1e3:>12.3f}{our_enc * 1e3:>13.3f}{sdk_enc / our_enc:>7.1f}"
            f"{sdk_dec * 1e3:>12.3f}{our_dec * 1e3:>13.3f}{sdk_dec / our_dec:>7.1f}"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

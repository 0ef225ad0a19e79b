"""Brush RLE: our codec against label-studio-sdk's reference, in one run.

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
before timing. The machine may be shared, so the two sides are measured interleaved: each of
7 rounds times one ~20 ms batch of the SDK, then one of ours, so that load hits both alike. A
time is the best round, per call; the ratio is SDK best / our best, and "med x" is the median
of the 7 per-round ratios (a check that the best rounds were not a lucky pair). Our kernels are
warmed up first; the start-up cost of a fresh process (import, warmup, first call) is timed in
a child process. The load average is printed before and after. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.labelstudio.rle import decode_rle, mask_to_rle, warmup

DEFAULT_MASKS = Path("/work/shared/data/usgra-seg/masks")
NERVE = 1
AGGREGATE_LIMIT = 20
NOISE_FRACTION = 0.05
T = TypeVar("T")


ROUNDS = 7
BATCH_SECONDS = 0.02


def batch_size(fn: Callable[[], object]) -> int:
    """Calls per batch so that one batch takes about ``BATCH_SECONDS`` (after a warm-up call)."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, round(BATCH_SECONDS / max(once, 1e-7)))


def timed(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def interleaved(sdk: Callable[[], object], ours: Callable[[], object]) -> tuple[float, float, float]:
    """Seconds per call of each, best of ``ROUNDS`` alternating rounds, and the median round ratio."""
    sdk_n, our_n = batch_size(sdk), batch_size(ours)
    sdk_times, our_times = [], []
    for _ in range(ROUNDS):
        sdk_times.append(timed(sdk, sdk_n))
        our_times.append(timed(ours, our_n))
    ratio = float(np.median(np.divide(sdk_times, our_times)))
    return min(sdk_times), min(our_times), ratio


def fresh_process_start() -> str:
    """Seconds a new interpreter spends importing the codec, in warmup(), then on a first encode."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, time; import numpy as np; t0 = time.perf_counter()\n"
        "from backend.labelstudio.rle import mask_to_rle, warmup; t1 = time.perf_counter()\n"
        "warmup(); t2 = time.perf_counter()\n"
        "mask_to_rle(np.eye(512, dtype=bool)); t3 = time.perf_counter()\n"
        "print(f'import {t1 - t0:.3f} s, warmup {t2 - t1:.3f} s, first 512x512 encode {(t3 - t2) * 1e3:.2f} ms')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


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
    print(f"fresh process: {fresh_process_start()}")
    warmup()
    rows = []
    for label, masks in (("nerve", [nerve]), ("noisy (5% flipped)", [noisy]), (f"nerve x {len(group)}", group)):
        streams = [mask_to_rle(mask) for mask in masks]
        for mask, stream in zip(masks, streams, strict=True):
            if stream != list(sdk_encode(mask)):
                raise SystemExit(f"{label}: our bytes differ from the SDK's")
            if not np.array_equal(decode_rle(stream), sdk_decode(stream)):
                raise SystemExit(f"{label}: our decoding differs from the SDK's")
        enc = interleaved(each(sdk_encode, masks), each(mask_to_rle, masks))
        dec = interleaved(each(sdk_decode, streams), each(decode_rle, streams))
        rows.append((label, sum(map(len, streams)), enc, dec))

    print("\nidentical bytes and words: yes (checked for every mask)\n")
    header = f"{'case':<20}{'RLE bytes':>10}"
    for side in ("enc", "dec"):
        header += f"{side + ' SDK ms':>12}{side + ' ours ms':>13}{'x':>7}{'med x':>7}"
    print(header)
    print("-" * len(header))
    for label, size, *pairs in rows:
        line = f"{label:<20}{size:>10}"
        for sdk_s, our_s, median in pairs:
            line += f"{sdk_s * 1e3:>12.3f}{our_s * 1e3:>13.3f}{sdk_s / our_s:>7.1f}{median:>7.1f}"
        print(line)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

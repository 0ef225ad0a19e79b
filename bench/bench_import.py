"""``sonoseg import`` throughput: PNG frames with masks into a fresh SQLite data directory.

    .venv/bin/python bench/bench_import.py                         # 10,000 frames of 128x128
    .venv/bin/python bench/bench_import.py --frames 2000 --size 256

Generates ``--frames`` distinct grey PNG frames (``--size`` square) and a class-index mask for each
(a bright disc = 1, a dark disc = 2, on speckle) in a temp folder, then:

* **baseline**: for every file, what any import must do without a database or a store: read and
  sha256 the file's bytes, decode the image and the mask (backend.imaging), hash the pixels;
* **import**: ``backend.services.dataset.import_files`` of the same folder with ``--masks`` into a
  new SQLite database migrated to head and an empty blob store (one unit of work per file, as
  ``sonoseg import`` does).

Prints frames/s of both, the ratio import / baseline time (the database and store overhead per
frame: grey PNG encoding, blob writes with fsync, rows, one commit per file), CPU time, and the
peak RSS (``resource.getrusage``) of this process and of the import's reader process. The
target on 2 cores is at least 50 frames/s for the import. Everything is removed at the end
(``--keep`` keeps it). Never run by the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.db.migrate import upgrade
from backend.db.session import make_engine, make_session_factory
from backend.imaging.io import encode_png, read_image, read_mask_frames
from backend.services.dataset import ImportProgress, import_files
from backend.services.images import pixel_hash
from backend.services.masks import mask_sha256
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore


def generate(folder: Path, frames: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """``frames`` distinct PNG frames and masks (``images/NNNNNN.png``, ``masks/NNNNNN.png``)."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(frames):
        img = rng.gamma(2.0, 25.0, size=(size, size))
        mask = np.zeros((size, size), np.uint8)
        cy, cx, r = rng.uniform(0.3, 0.7, 2) * size, 0.3 * size, 0.12 * size
        nerve = (yy - cy[0]) ** 2 + (xx - cx) ** 2 < r**2
        vessel = (yy - cy[1]) ** 2 + (xx - 0.7 * size) ** 2 < (0.08 * size) ** 2
        img[nerve] += 90
        img[vessel] *= 0.15
        mask[nerve], mask[vessel] = 1, 2
        (images / f"{i:06d}.png").write_bytes(encode_png(np.clip(img, 0, 255).astype(np.uint8)))
        (masks / f"{i:06d}.png").write_bytes(encode_png(mask))
    return images, masks


def baseline(images: Path, masks: Path) -> float:
    """Seconds to read, hash and decode every image and mask, with no database or store."""
    start = time.perf_counter()
    for path in sorted(images.iterdir()):
        hashlib.sha256(path.read_bytes()).hexdigest()
        frames = read_image(path)
        labels = read_mask_frames(masks / path.name)
        for frame, label in zip(frames, labels, strict=True):
            pixel_hash(frame.pixels)
            mask_sha256(label)
    return time.perf_counter() - start


def run_import(work: Path, images: Path, masks: Path, frames: int) -> float:
    data_dir = work / "data"
    data_dir.mkdir()
    settings = Settings(data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'sonoseg.db'}")
    engine = make_engine(settings.database_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    store = LocalBlobStore(settings.store_dir)
    step = max(1, frames // 10)

    def progress(p: ImportProgress) -> None:
        if p.done % step == 0:
            print(f"  imported {p.done}/{p.total} in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    start = time.perf_counter()
    report = import_files(
        factory,
        store,
        settings,
        project_name="bench",
        class_names=("Nerve", "Vessel"),
        paths=[images],
        mask_dir=masks,
        on_item=progress,
    )
    elapsed = time.perf_counter() - start
    engine.dispose()
    if (report.images_added, report.masks_added, report.errors) != (frames, frames, []):
        raise SystemExit(
            f"import went wrong: {report.images_added} images, {report.masks_added} masks, {report.errors[:3]}"
        )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=128, help="side of the square frames, pixels")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes [system temp]")
    parser.add_argument("--keep", action="store_true", help="keep the generated files and the data directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sonoseg-bench-import-", dir=args.workdir))
    try:
        print(f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, work dir {work}")
        t = time.perf_counter()
        images, masks = generate(work / "in", args.frames, args.size)
        print(f"generated {args.frames} frames + masks of {args.size}x{args.size} in {time.perf_counter() - t:.1f} s")
        base = baseline(images, masks)
        before = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = run_import(work, images, masks, args.frames)
        after = resource.getrusage(resource.RUSAGE_SELF)
        reader = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reader process, once it has exited
        rss, rss_before = after.ru_maxrss, before.ru_maxrss  # KiB on Linux
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        reader_cpu = reader.ru_utime + reader.ru_stime
        print(f"baseline (read + sha256 + decode image and mask + pixel hashes): {args.frames / base:8.1f} frames/s")
        print(f"import   (--masks, fresh SQLite, one unit of work per file):     {args.frames / elapsed:8.1f} frames/s")
        print(
            f"import / baseline time: {elapsed / base:.2f}x  ({(elapsed - base) / args.frames * 1e3:.2f} ms per frame)"
        )
        print(
            f"import CPU time per frame: {cpu / args.frames * 1e3:.2f} ms here + "
            f"{reader_cpu / args.frames * 1e3:.2f} ms in the reader process (user + system)"
        )
        print(
            f"peak RSS: {rss / 1024:.0f} MiB here (before the import: {rss_before / 1024:.0f} MiB), "
            f"{reader.ru_maxrss / 1024:.0f} MiB the reader process"
        )
        print(f"target >= 50 frames/s: {'met' if args.frames / elapsed >= 50 else 'NOT met'}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

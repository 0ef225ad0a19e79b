"""Write the seed corpora of the fuzz targets: small valid files of every format, a few edge cases.

    .venv/bin/python fuzz/make_seeds.py          # (re)writes fuzz/corpus/*/seed-*

Only ``seed-*`` files are rewritten; reproducers saved after a fix (``crash-*``, ``timeout-*``,
``oom-*``) are kept. Images are tiny (a few hundred bytes to a few KB): the corpus stays well
under a few hundred KB, and the replay test stays fast. Deterministic: same bytes every run
(DICOM UIDs come from a fixed prefix, random pixels from fixed seeds).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from backend.labelstudio.rle import mask_to_rle  # noqa: E402
from fuzz.harness import rle_input  # noqa: E402
from tests.support import imaging as samples  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"


def _sitk_bytes(
    suffix: str,
    array: np.ndarray,
    *,
    vector: bool = False,
    compress: bool = False,
    spacing: tuple[float, ...] | None = None,
) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"seed{suffix}"
        samples.write_sitk(path, array, vector=vector, compress=compress, spacing=spacing)
        return path.read_bytes()


def _dicom_bytes(pixels: np.ndarray, **kwargs: object) -> bytes:
    import pydicom.uid

    counter = iter(range(1, 1000))
    original = pydicom.uid.generate_uid
    pydicom.uid.generate_uid = lambda *a, **k: f"1.2.826.0.1.3680043.10.1.{next(counter)}"  # deterministic
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "seed.dcm"
            samples.write_dicom(path, pixels, **kwargs)  # type: ignore[arg-type]
            return path.read_bytes()
    finally:
        pydicom.uid.generate_uid = original


def image_seeds() -> dict[str, bytes]:
    grey = samples.random_grey((6, 8), seed=1)
    rgb = samples.random_grey((6, 8, 3), seed=2)
    rgba = samples.random_grey((6, 8, 4), seed=3)
    grey16 = samples.random_grey((6, 8), seed=4, dtype=np.uint16)
    cine = samples.random_grey((3, 6, 8), seed=5)
    smooth = (np.add.outer(np.arange(16), np.arange(16)) * 8).astype(np.uint8)  # JPEG-friendly
    jpeg = _sitk_bytes(".jpg", smooth)
    seeds: dict[str, Callable[[], bytes]] = {
        "png-grey.png": lambda: _sitk_bytes(".png", grey),
        "png-rgb.png": lambda: _sitk_bytes(".png", rgb, vector=True),
        "png-rgba.png": lambda: _sitk_bytes(".png", rgba, vector=True),
        "png-grey16.png": lambda: _sitk_bytes(".png", grey16),
        "png-palette.png": lambda: samples.palette_png(
            np.array([[0, 1, 2], [2, 1, 0]], np.uint8), [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
        ),
        "png-grey-alpha.png": samples.grey_alpha_png,
        "png-bomb-30000.png": lambda: samples.bomb_png(30000),
        "png-truncated.png": lambda: _sitk_bytes(".png", grey)[:-20],
        "jpeg-grey.jpg": lambda: jpeg,
        "jpeg-rgb.jpg": lambda: _sitk_bytes(".jpg", np.stack([smooth, smooth[::-1], smooth.T], -1), vector=True),
        "jpeg-exif-6.jpg": lambda: samples.add_exif_orientation(jpeg, 6),
        "jpeg-truncated.jpg": lambda: jpeg[: len(jpeg) // 2],
        "tiff-grey.tif": lambda: _sitk_bytes(".tif", grey),
        "tiff-grey16.tif": lambda: _sitk_bytes(".tif", grey16),
        "tiff-pages.tif": lambda: _sitk_bytes(".tif", cine),
        "tiff-ifd-first.tif": lambda: samples.tiff_ifd_first(grey),
        "bmp-grey.bmp": lambda: _sitk_bytes(".bmp", grey),
        "bmp-rgb.bmp": lambda: _sitk_bytes(".bmp", rgb, vector=True),
        "dicom-mono8.dcm": lambda: _dicom_bytes(grey),
        "dicom-mono16-window.dcm": lambda: _dicom_bytes(grey16, extra={"WindowCenter": 30000, "WindowWidth": 20000}),
        "dicom-cine.dcm": lambda: _dicom_bytes(cine, frames=3),
        "dicom-rgb.dcm": lambda: _dicom_bytes(rgb, photometric="RGB"),
        "dicom-implicit.dcm": lambda: _dicom_bytes(grey, implicit=True),
        "dicom-regions-undefined-lengths.dcm": lambda: _dicom_bytes(
            grey, regions=[samples.us_region(0.01, 0.01)], undefined_lengths=True
        ),
        "dicom-no-pixels.dcm": lambda: _dicom_bytes(grey, pixel_data=False),
        "nifti-grey.nii": lambda: _sitk_bytes(".nii", grey, spacing=(0.1, 0.2)),
        "nifti-volume.nii.gz": lambda: _sitk_bytes(".nii.gz", cine.astype(np.int16), compress=True),
        "nifti-float.nii": lambda: _sitk_bytes(".nii", grey.astype(np.float32) / 7),
        "mha-grey.mha": lambda: _sitk_bytes(".mha", grey, spacing=(0.3, 0.3)),
        "mha-compressed.mha": lambda: _sitk_bytes(".mha", cine, compress=True),
        "text-named.png": lambda: b"this is not an image, whatever its name says\n",
    }
    return {name: make() for name, make in seeds.items()}


def rle_seeds() -> dict[str, bytes]:
    from tests.test_rle import thing_encode  # the independent thi.ng encoder of the oracle tests

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:24, 0:32]
    blob = (yy - 12) ** 2 + (xx - 15) ** 2 < 60
    seeds = {
        "rle-blob-24x32": rle_input(mask_to_rle(blob), 24, 32),
        "rle-empty-3x5": rle_input(mask_to_rle(np.zeros((3, 5), bool)), 3, 5),
        "rle-full-64x64": rle_input(mask_to_rle(np.ones((64, 64), bool)), 64, 64),
        "rle-noise-9x11": rle_input(mask_to_rle(rng.random((9, 11)) < 0.5), 9, 11),
        "rle-one-pixel-1x1": rle_input(mask_to_rle(np.ones((1, 1), bool)), 1, 1),
        "rle-wrong-size": rle_input(mask_to_rle(blob), 23, 32),
        "rle-truncated": rle_input(mask_to_rle(blob)[:-3], 24, 32),
        "rle-forged-4gi-words": rle_input([0xFF, 0xFF, 0xFF, 0xFF, *mask_to_rle(blob)[4:]], 24, 32),
        "rle-int16-out-of-range": rle_input([*mask_to_rle(blob)[:-1], 300, -1], 24, 32),
    }
    alpha = np.repeat(rng.random(6 * 7) < 0.5, 4).astype(np.uint8) * 255
    for word_size, sizes in ((8, [1, 2, 5, 9]), (3, [2, 3, 4, 6]), (1, [1, 1, 1, 1])):
        words = (alpha >> (8 - word_size)).tolist()
        seeds[f"rle-thing-w{word_size}-6x7"] = rle_input(thing_encode(words, word_size, sizes), 6, 7)
    return seeds


def main() -> None:
    for target, seeds in (("image_readers", image_seeds()), ("rle", rle_seeds())):
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for name, data in seeds.items():
            (folder / f"seed-{name}").write_bytes(data)
        total = sum(len(d) for d in seeds.values())
        print(f"{folder.relative_to(ROOT)}: {len(seeds)} seeds, {total} bytes")


if __name__ == "__main__":
    main()

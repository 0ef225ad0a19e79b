"""Image and mask files for the model's own tools (``sonoseg model ...``, benches).

Reading goes through :mod:`backend.imaging.io`, the one reader of image files in sonoseg (format
sniffing, truncation and size checks, palette PNG masks, DICOM de-identification); this module
only adapts it to "one 2D frame per file" and adds PNG writing and folder listing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from backend.errors import InvalidImage
from backend.imaging import io

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz", ".mha", ".mhd")


def read_image(path: Path) -> NDArray[np.uint8]:
    """The file's single grey frame as uint8 (H, W); a multi-frame file is refused."""
    frames = io.read_image(path)
    if len(frames) != 1:
        raise InvalidImage(
            f"{Path(path).name}: {len(frames)} frames; the model tools take one frame per file "
            "(import cine files with `sonoseg import`, which splits them)"
        )
    return frames[0].pixels


def read_mask(path: Path) -> NDArray[np.int64]:
    """A class-index mask as int64 (H, W); a 0/255 mask means class 1 (see ``io.read_mask``)."""
    return io.read_mask(path).astype(np.int64)


def write_png(path: Path, array: NDArray[Any]) -> None:
    """Write uint8 (H, W) greyscale or (H, W, 3) RGB as PNG."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"write_png takes uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(io.encode_png(np.ascontiguousarray(array)))


def stem_of(path: Path) -> str:
    """File name without its image suffix (``a.nii.gz`` -> ``a``)."""
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def list_images(directory: Path) -> list[Path]:
    """Image files directly in ``directory``, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))

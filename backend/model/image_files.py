"""Reading frames and masks from files, and writing PNGs, for the model's own tools (CLI, benches).

Stop-gap until ``backend.imaging.io`` (``read_image`` / ``read_mask``) lands: every file read of the
model package goes through :func:`read_image` and :func:`read_mask` here, so swapping is one edit.

SimpleITK expands palette ("P" mode) PNGs to RGB, which loses the class indices that label tools
store in the palette index. :func:`read_mask` undoes that by reading the PNG's PLTE chunk and
mapping each RGB triple back to its first palette index.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from backend.errors import InvalidImage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".nrrd")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_array(path: Path) -> NDArray[Any]:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InvalidImage(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1]})") from exc
    arr: NDArray[Any] = sitk.GetArrayFromImage(img)
    components = int(img.GetNumberOfComponentsPerPixel())  # type: ignore[no-untyped-call]
    if arr.ndim == 3 and components == 1 and arr.shape[0] == 1:
        arr = arr[0]  # a single-slice volume
    return arr


def read_image(path: Path) -> NDArray[np.uint8]:
    """A greyscale frame as uint8 (H, W). Colour is averaged; other bit depths are rescaled."""
    arr: NDArray[Any] = _read_array(path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if arr.dtype == np.uint8:  # the common case: grey stored as RGB(A)
            grey: NDArray[np.uint16] = (arr[..., :3].astype(np.uint16).sum(axis=-1) + 1) // 3
            return grey.astype(np.uint8)
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2:
        raise InvalidImage(f"{path}: expected a 2D greyscale frame, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.uint8, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 255:
        rounded: NDArray[np.uint8] = np.rint(arr).astype(np.uint8)
        return rounded
    scaled: NDArray[np.float64] = (arr - lo) / max(hi - lo, 1e-12) * 255
    return np.rint(scaled).astype(np.uint8)


def _png_palette(path: Path) -> NDArray[Any] | None:
    """The PLTE chunk of a PNG as (n, 3) uint8, or None when there is none."""
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"PLTE":
            if (
                length % 3
                or zlib.crc32(kind + body) != struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
            ):
                raise InvalidImage(f"{path}: corrupt PNG palette")
            return np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def read_mask(path: Path) -> NDArray[np.int64]:
    """A class-index mask as int64 (H, W). Palette PNGs give their palette index; a mask holding
    only 0 and 255 means one foreground class and becomes 0/1."""
    arr = _read_array(path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        palette = _png_palette(path) if path.suffix.lower() == ".png" else None
        if palette is None:
            raise InvalidImage(f"{path}: a colour mask without a palette; masks must hold class indices")
        arr = _unpalette(arr[..., :3], palette, path)
    if arr.ndim != 2:
        raise InvalidImage(f"{path}: expected a 2D mask, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and (not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))):
        raise InvalidImage(f"{path}: mask values must be whole class indices")
    mask = arr.astype(np.int64)
    if mask.min() < 0:
        raise InvalidImage(f"{path}: negative values in a mask")
    if mask.size and int(mask.max()) == 255 and bool(((mask == 0) | (mask == 255)).all()):
        mask = (mask == 255).astype(np.int64)
    return mask


def _unpalette(rgb: NDArray[Any], palette: NDArray[Any], path: Path) -> NDArray[Any]:
    """Map RGB pixels back to palette indices (the first index when a colour repeats)."""
    pal = palette.astype(np.int32)
    pal_keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(pal_keys, kind="stable")  # stable: equal colours keep their lowest index first
    sorted_keys = pal_keys[order]
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2].astype(np.int32)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    if not np.array_equal(sorted_keys[pos], keys):
        raise InvalidImage(f"{path}: a pixel colour that is not in the PNG palette")
    indices: NDArray[np.int64] = order[pos].astype(np.int64)
    return indices


def write_png(path: Path, array: NDArray[Any]) -> None:
    """Write uint8 (H, W) greyscale or (H, W, 3) RGB as PNG."""
    import SimpleITK as sitk

    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"write_png takes uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=array.ndim == 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


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

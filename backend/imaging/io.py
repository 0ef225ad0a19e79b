# mypy: disable-error-code="no-untyped-call"
# (SimpleITK is an untyped SWIG module; every other check stays strict.)
"""Read what a sonographer exports into 2D uint8 frames, and label maps into class indices.

Supported: PNG, JPEG, TIFF, BMP, DICOM Part 10 (single frame and multi-frame cine), NIfTI
(``.nii``, ``.nii.gz``) and MetaImage (``.mha``, ``.mhd``), all decoded by SimpleITK. The format
is decided from the file's first bytes; the name only has to carry a known extension (DICOM is
accepted under any name, since scanners often write bare UIDs).

Rules the rest of sonoseg relies on:

* **Frames.** A 2D file is one frame. A 3D file (DICOM cine, multi-page TIFF, NIfTI/MetaImage
  volume) gives one frame per z slice in file order; a volume with a single slice is a 2D image.
* **Colour.** RGB and RGBA (alpha ignored) become grey by ITU-R BT.601 luma,
  ``Y = 0.299 R + 0.587 G + 0.114 B``, rounded. GDCM turns DICOM YBR_* into RGB first, so their
  grey is the same luma. Pixels whose channels are all equal are taken as is (exact).
* **Intensity.** uint8 pixels are kept as they are. Anything else (16/32-bit, float) is mapped to
  uint8 by the DICOM VOI window (first WindowCenter/WindowWidth, linear function of PS3.3
  C.11.2.1.2) when the file has one, otherwise by min-max over the whole file (all frames
  together, so a cine does not flicker); a constant image becomes 0; NaN and -inf count as the
  minimum, +inf as the maximum.
* **Orientation.** JPEG EXIF orientation is applied, so pixels match what a browser, and hence
  Label Studio, shows.
* **Geometry.** Spacing is (row_mm, col_mm) for NIfTI/MetaImage and for DICOM with PixelSpacing
  or one consistent ultrasound region; otherwise None (PNG/JPEG/BMP/TIFF resolution tags are
  print DPI, not anatomy). Origin and direction are kept, in SimpleITK's physical (x, y[, z])
  order, only for NIfTI/MetaImage.
* **Safety.** Size limits are checked on the file and then on the header (before any pixel is
  decoded); truncation is detected per format (PNG IEND, JPEG EOI, BMP/NIfTI/MetaImage sizes,
  DICOM element walk) because several SimpleITK readers silently return partial pixels;
  MetaImage may only point at a data file next to its header. The checks before decoding live
  in :mod:`backend.imaging.containers`. Every failure is
  :class:`~backend.errors.InvalidImage` naming the file and the reason. No temp file survives.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from backend.errors import InvalidImage, InvalidInput
from backend.imaging import dicom
from backend.imaging.containers import (
    PNG_PALETTE,
    PNG_SIGNATURE,
    MiB,
    Source,
    bytes_source,
    local_source,
    png_palette,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIDE = 8192
DEFAULT_MAX_BYTES = 256 * MiB
DEFAULT_MAX_DECODED_BYTES = 1024 * MiB  # pixels in memory after decoding, before conversion

_IMAGE_IO: Mapping[str, str] = MappingProxyType({
    "png": "PNGImageIO", "jpeg": "JPEGImageIO", "tiff": "TIFFImageIO", "bmp": "BMPImageIO",
    "dicom": "GDCMImageIO", "nifti": "NiftiImageIO", "metaimage": "MetaImageIO",
})
_COMPONENT_BYTES: Mapping[int, int] = MappingProxyType({
    pid: size
    for size, pids in {
        1: (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkVectorUInt8, sitk.sitkVectorInt8),
        2: (sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkVectorUInt16, sitk.sitkVectorInt16),
        4: (sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkFloat32, sitk.sitkVectorUInt32,
            sitk.sitkVectorInt32, sitk.sitkVectorFloat32),
        8: (sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat64, sitk.sitkVectorUInt64,
            sitk.sitkVectorInt64, sitk.sitkVectorFloat64),
    }.items()
    for pid in pids
})
_LUMA_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Geometry:
    """Where a frame's pixels sit in the patient; every field is None when the format has no idea.

    ``spacing`` is numpy order (row_mm, col_mm). ``origin`` (mm) and ``direction`` (row-major
    cosines, 4 or 9 values) stay in SimpleITK's physical (x, y[, z]) order so a writer can hand
    them back unchanged; only spacing is flipped, by :func:`xy_to_rowcol`.
    """

    spacing: tuple[float, float] | None = None
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None


@dataclass(frozen=True)
class LoadedImage:
    """One 2D frame: ``pixels`` is uint8 (H, W); ``metadata`` holds only allow-listed DICOM tags."""

    pixels: NDArray[np.uint8]
    frame_index: int
    geometry: Geometry
    source_format: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Decoded:
    pixels: NDArray[Any]  # (frames, H, W) or (frames, H, W, C), as SimpleITK decoded them
    image: sitk.Image
    tags: dict[str, str]


def xy_to_rowcol(values_xy: Sequence[float]) -> tuple[float, float]:
    """SimpleITK (x, y) -> numpy (row, col), and back: the only axis flip in sonoseg.

    SimpleITK indexes images as (x=column, y=row[, z]) while ``GetArrayFromImage`` returns
    (..., row, col); nnU-Net's SimpleITKIO does the same reversal. The swap is its own inverse.
    """
    return (float(values_xy[1]), float(values_xy[0]))


# -- public API -----------------------------------------------------------------------------

def read_image(path: Path | str, *, max_side: int = DEFAULT_MAX_SIDE, max_bytes: int = DEFAULT_MAX_BYTES,
               max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> list[LoadedImage]:
    """Read every frame of an image file as grey uint8 (see the module docstring for the rules)."""
    with local_source(Path(path), max_bytes) as source:
        return _load_frames(source, max_side, max_decoded_bytes)


def read_image_bytes(data: bytes, filename_hint: str, *, max_side: int = DEFAULT_MAX_SIDE,
                     max_bytes: int = DEFAULT_MAX_BYTES,
                     max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> list[LoadedImage]:
    """Like :func:`read_image` for downloaded bytes; ``filename_hint`` only names them in errors."""
    with bytes_source(data, filename_hint, max_bytes) as source:
        return _load_frames(source, max_side, max_decoded_bytes)


def read_mask(path: Path | str, *, frame_index: int | None = None, max_side: int = DEFAULT_MAX_SIDE,
              max_bytes: int = DEFAULT_MAX_BYTES,
              max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> NDArray[np.uint8]:
    """Read a label map as uint8 class indices (H, W); values are never rescaled.

    Palette PNGs give their palette indices; a 0/255 binary mask gives 0/1. Lossy JPEG and DICOM
    are refused. A multi-slice segmentation needs ``frame_index``.
    """
    with local_source(Path(path), max_bytes) as source:
        if source.fmt in {"jpeg", "dicom"}:
            raise InvalidImage(f"{source.name}: a {source.fmt.upper()} file cannot hold a label map; "
                               "use PNG, TIFF, BMP, NIfTI or MetaImage")
        labels = _class_indices(source, _decode(source, max_side, max_decoded_bytes).pixels)
    if frame_index is None:
        if labels.shape[0] != 1:
            raise InvalidImage(f"{source.name}: the mask has {labels.shape[0]} slices; pass frame_index")
        frame_index = 0
    if not 0 <= frame_index < labels.shape[0]:
        raise InvalidImage(f"{source.name}: frame {frame_index} requested, the mask has {labels.shape[0]}")
    mask = labels[frame_index]
    if mask.max(initial=0) == 255 and not np.isin(mask, (0, 255), invert=True).any():
        mask = (mask == 255).astype(np.uint8)  # a 0/255 binary export means "class 1"
    return np.ascontiguousarray(mask)


def encode_png(array: NDArray[np.uint8]) -> bytes:
    """Lossless PNG of a uint8 array: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA.

    Written with zlib because SimpleITK only writes to files; filter 0, zlib level 6.
    """
    a = np.asarray(array)
    colour_types = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)
    channels = 1 if a.ndim == 2 else (a.shape[2] if a.ndim == 3 else 0)
    if a.dtype != np.uint8 or channels not in colour_types or a.size == 0:
        raise InvalidInput(f"encode_png needs uint8 (H, W), (H, W, 3) or (H, W, 4), got {a.dtype} {a.shape}")
    height, width = a.shape[:2]
    rows = np.ascontiguousarray(a).reshape(height, -1)
    raw = np.zeros((height, rows.shape[1] + 1), dtype=np.uint8)  # column 0: filter type 0
    raw[:, 1:] = rows
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_types[channels], 0, 0, 0)
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + _png_chunk(b"IEND", b""))


def decode_png_bytes(data: bytes, *, max_side: int = DEFAULT_MAX_SIDE, max_bytes: int = DEFAULT_MAX_BYTES,
                     max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> NDArray[Any]:
    """Decode PNG bytes as stored: (H, W) grey, (H, W, C) colour, palette PNGs as indices."""
    with bytes_source(data, "PNG data", max_bytes) as source:
        if source.fmt != "png":
            raise InvalidImage(f"{source.name}: expected PNG, got {source.fmt}")
        pixels = _decode(source, max_side, max_decoded_bytes).pixels
        if source.png_colour_type == PNG_PALETTE:
            pixels = _palette_indices(pixels, png_palette(source), source.name)
    return np.ascontiguousarray(pixels[0])



# -- decoding and conversion -----------------------------------------------------------------

def _itk_reason(exc: RuntimeError, source: Source) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = re.sub(r"^.*?ERROR: \w+\(0x[0-9a-fA-F]+\):\s*", "", lines[-1] if lines else "unknown error")
    return reason.replace(str(source.path), source.name)


def _decode(source: Source, max_side: int, max_decoded_bytes: int) -> _Decoded:
    """Check the header's size against the limits, then decode; frames first: (F, H, W[, C])."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source.path))
    reader.SetImageIO(_IMAGE_IO[source.fmt])
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InvalidImage(f"{source.name}: unreadable {source.fmt} header: {_itk_reason(exc, source)}") from exc
    size, components = reader.GetSize(), reader.GetNumberOfComponents()
    if len(size) not in (2, 3) or min(size) < 1:
        raise InvalidImage(f"{source.name}: unsupported image size {size} (need 2D, or 3D frames)")
    if max(size[0], size[1]) > max_side:
        raise InvalidImage(f"{source.name}: {size[0]}x{size[1]} pixels exceeds the {max_side}-pixel side limit")
    component_bytes = _COMPONENT_BYTES.get(reader.GetPixelID())
    if component_bytes is None or components > 4:
        raise InvalidImage(f"{source.name}: unsupported pixel type "
                           f"{sitk.GetPixelIDValueAsString(reader.GetPixelID())} with {components} components")
    decoded = int(np.prod(size, dtype=np.int64)) * components * component_bytes
    if decoded > max_decoded_bytes:
        raise InvalidImage(f"{source.name}: {decoded} decoded bytes exceeds the {max_decoded_bytes}-byte limit")
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InvalidImage(f"{source.name}: cannot decode pixels: {_itk_reason(exc, source)}") from exc
    pixels = sitk.GetArrayFromImage(image)
    if len(size) == 2:
        pixels = pixels[np.newaxis]
    tags = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()} if source.fmt == "dicom" else {}
    return _Decoded(pixels, image, tags)


def _load_frames(source: Source, max_side: int, max_decoded_bytes: int) -> list[LoadedImage]:
    decoded = _decode(source, max_side, max_decoded_bytes)
    pixels, image, tags = decoded.pixels, decoded.image, decoded.tags
    if source.fmt == "jpeg" and pixels.ndim == 4 and pixels.shape[3] == 4:
        raise InvalidImage(f"{source.name}: CMYK JPEGs are not supported; export as RGB or grey")
    regions = source.dicom_scan.regions if source.dicom_scan is not None else ()
    if source.fmt == "dicom":
        frames = dicom.dicom_frame_count(tags)
        if frames is not None and frames != pixels.shape[0]:
            raise InvalidImage(f"{source.name}: NumberOfFrames says {frames}, decoded {pixels.shape[0]}")
    grey = _to_uint8(_to_grey(pixels), pixels.dtype == np.uint8, dicom.dicom_window(tags))
    metadata = dicom.kept_metadata(tags, regions) if source.fmt == "dicom" else {}
    result = []
    for k in range(grey.shape[0]):
        frame = _ORIENT[source.jpeg_orientation](grey[k])
        result.append(LoadedImage(np.ascontiguousarray(frame), k, _geometry(source, image, tags, regions, k),
                                  source.fmt, dict(metadata)))
    logger.debug("read %s: %s, %d frame(s) of %dx%d", source.name, source.fmt, len(result),
                 result[0].pixels.shape[1], result[0].pixels.shape[0])
    return result


def _geometry(source: Source, image: sitk.Image, tags: Mapping[str, str],
              regions: tuple[dicom.UltrasoundRegion, ...], k: int) -> Geometry:
    if source.fmt == "dicom":
        return Geometry(spacing=dicom.dicom_spacing(tags, xy_to_rowcol(image.GetSpacing()), regions))
    if source.fmt not in {"nifti", "metaimage"}:
        return Geometry()
    origin = image.TransformIndexToPhysicalPoint((0, 0, k)) if image.GetDimension() == 3 else image.GetOrigin()
    return Geometry(xy_to_rowcol(image.GetSpacing()), tuple(origin), tuple(image.GetDirection()))


def _to_grey(pixels: NDArray[Any]) -> NDArray[Any]:
    """(F, H, W[, C]) -> (F, H, W): BT.601 luma for colour, channel 0 when channels are equal."""
    if pixels.ndim == 3:
        return pixels
    if pixels.shape[3] < 3:
        return pixels[..., 0]
    rgb = pixels[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0]
    return rgb.astype(np.float32) @ _LUMA_BT601


def _to_uint8(grey: NDArray[Any], from_uint8: bool, window: tuple[float, float] | None) -> NDArray[np.uint8]:
    """Apply the intensity rule of the module docstring to the whole file at once."""
    if grey.dtype == np.uint8:
        return grey
    if from_uint8:
        return np.asarray(np.clip(np.rint(grey), 0, 255), dtype=np.uint8)
    values = grey.astype(np.float32)
    if window is not None:  # DICOM PS3.3 C.11.2.1.2.1, linear VOI function
        center, width = window
        scaled = ((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.asarray(np.clip(np.rint(scaled), 0, 255), dtype=np.uint8)


# EXIF orientation (CIPA DC-008 tag 0x0112) -> the numpy operation that makes the frame upright.
_ORIENT: Mapping[int, Callable[[NDArray[Any]], NDArray[Any]]] = MappingProxyType({
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].T,
    8: lambda a: np.rot90(a, 1),
})


# -- label maps --------------------------------------------------------------------------------

def _class_indices(source: Source, pixels: NDArray[Any]) -> NDArray[np.uint8]:
    """(F, H, W[, C]) decoded label pixels -> uint8 class indices (F, H, W), never rescaled."""
    if source.png_colour_type == PNG_PALETTE:
        return _palette_indices(pixels, png_palette(source), source.name)
    if pixels.ndim == 4:
        channels = pixels[..., : min(3, pixels.shape[3])]
        if not all(np.array_equal(channels[..., 0], channels[..., c]) for c in range(channels.shape[3])):
            raise InvalidImage(f"{source.name}: a colour mask without a palette cannot be mapped to classes")
        pixels = channels[..., 0]
    if pixels.dtype.kind == "f":
        if not np.all(np.isfinite(pixels)) or not np.array_equal(pixels, np.round(pixels)):
            raise InvalidImage(f"{source.name}: label values must be whole numbers")
    low, high = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
    if low < 0 or high > 255:
        raise InvalidImage(f"{source.name}: label values must lie in 0..255, found {low}..{high}")
    return pixels.astype(np.uint8)




def _palette_indices(rgb: NDArray[Any], palette: NDArray[np.uint8], name: str) -> NDArray[np.uint8]:
    """Undo SimpleITK's palette expansion: map each RGB(A) pixel back to its palette index."""
    def pack(c: NDArray[Any]) -> NDArray[Any]:
        return np.asarray((c[..., 0].astype(np.uint32) << 16) | (c[..., 1].astype(np.uint32) << 8) | c[..., 2])

    keys, palette_keys = pack(rgb), pack(palette)
    order = np.argsort(palette_keys, kind="stable")
    ranks = np.minimum(np.searchsorted(palette_keys[order], keys), len(order) - 1)
    if not np.array_equal(palette_keys[order][ranks], keys):
        raise InvalidImage(f"{name}: decoded colours do not match the PNG palette")
    colours, counts = np.unique(palette_keys, return_counts=True)
    if np.isin(keys, colours[counts > 1]).any():
        raise InvalidImage(f"{name}: the palette gives one colour to several used indices; indices are ambiguous")
    return np.asarray(order[ranks], dtype=np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

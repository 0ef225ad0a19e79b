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
* **Memory.** One decode's peak, beyond the encoded input (the downloaded bytes, their temp
  file, a JPEG's whole-file marker scan), is at most ``E x D + S`` bytes, where ``D = W x H x
  frames x channels x bytes per sample`` is the decoded size read from the header, ``E`` is 2
  for PNG, TIFF, BMP, NIfTI and MetaImage and 3 for JPEG and uncompressed DICOM (SimpleITK,
  GDCM and libjpeg hold one or two extra copies while they decode; measured, see
  docs/reliability-notes-decode.md), and ``S = 64 x min(W x H, max(2**18, W))`` bytes (at most
  16 MiB for rows up to 262144 pixels) is the scratch of the row-block conversion. Compressed
  (encapsulated, deflated or big-endian) DICOM is the exception: GDCM's codecs hold the file and
  several decompressed copies, so there ``E = 8`` plus 4 x the file size. For one
  ``max_side`` x ``max_side`` frame that is ``E x channels x bytes x max_side**2 + 16 MiB``:
  a 16-bit RGB PNG at most ``12 x max_side**2 + 16 MiB`` (784 MiB at 8192), an 8-bit grey PNG
  ``2 x max_side**2 + 16 MiB``. This holds because SimpleITK's buffer is read through a view
  (never copied), grey and uint8 are computed block of rows by block of rows into one uint8
  output (float32, never float64, and only for the block), and the min-max of a file is a
  separate pass over the same blocks. Every decode reserves that estimate from a process-wide
  :class:`~backend.imaging.budget.DecodeBudget` before decoding and gives it back afterwards,
  so concurrent decodes stay within ``SONOSEG_DECODE_MEMORY_BYTES`` together.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from backend.errors import InvalidImage, InvalidInput
from backend.imaging import dicom
from backend.imaging.budget import DecodeBudget, shared_budget
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

# The memory bound of the module docstring: E x decoded bytes + scratch.
BLOCK_PIXELS = 1 << 18  # pixels per conversion block (whole rows; at least one row)
SCRATCH_BYTES_PER_PIXEL = 64  # temporaries of the costliest block step (palette lookup) stay below this
_EXTRA_COPIES: Mapping[str, int] = MappingProxyType({"jpeg": 3, "dicom": 3})  # E; 2 for the others
_CODEC_COPIES, _CODEC_FILE_COPIES = 8, 4  # E, and copies of the file, for compressed DICOM (GDCM codecs)

_IMAGE_IO: Mapping[str, str] = MappingProxyType(
    {
        "png": "PNGImageIO",
        "jpeg": "JPEGImageIO",
        "tiff": "TIFFImageIO",
        "bmp": "BMPImageIO",
        "dicom": "GDCMImageIO",
        "nifti": "NiftiImageIO",
        "metaimage": "MetaImageIO",
    }
)
_COMPONENT_BYTES: Mapping[int, int] = MappingProxyType(
    {
        pid: size
        for size, pids in {
            1: (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkVectorUInt8, sitk.sitkVectorInt8),
            2: (sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkVectorUInt16, sitk.sitkVectorInt16),
            4: (
                sitk.sitkUInt32,
                sitk.sitkInt32,
                sitk.sitkFloat32,
                sitk.sitkVectorUInt32,
                sitk.sitkVectorInt32,
                sitk.sitkVectorFloat32,
            ),
            8: (
                sitk.sitkUInt64,
                sitk.sitkInt64,
                sitk.sitkFloat64,
                sitk.sitkVectorUInt64,
                sitk.sitkVectorInt64,
                sitk.sitkVectorFloat64,
            ),
        }.items()
        for pid in pids
    }
)
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
    """One 2D frame: ``pixels`` is uint8 (H, W); ``metadata`` holds only allow-listed DICOM tags.

    ``patient_id``: a DICOM file's raw PatientID, only so that an importer can derive the subject's
    keyed pseudonym (:func:`backend.imaging.dicom.patient_id`); never store, log or return it (it
    is left out of ``repr``).
    """

    pixels: NDArray[np.uint8]
    frame_index: int
    geometry: Geometry
    source_format: str
    metadata: dict[str, str] = field(default_factory=dict)
    patient_id: str | None = field(default=None, repr=False, compare=False)


@dataclass
class _Decoded:
    """What :func:`_decoding` yields; emptied when its block ends, so the pixels can be freed.

    ``pixels`` is a read-only view of SimpleITK's buffer (it keeps ``image`` alive): nothing
    derived from it may leave the block except fresh arrays.
    """

    pixels: NDArray[Any]  # (frames, H, W) or (frames, H, W, C), as SimpleITK decoded them
    image: sitk.Image
    tags: dict[str, str]


class _ImageBuffer:
    """Owner of a numpy view of an ``sitk.Image`` buffer: the view keeps the image alive.

    ``sitk.GetArrayViewFromImage`` alone does not (its memoryview has no owner), so a view that
    outlived its image would read freed memory.
    """

    def __init__(self, image: sitk.Image) -> None:
        view = sitk.GetArrayViewFromImage(image)
        self.image = image
        self.__array_interface__ = dict(view.__array_interface__, data=(view.ctypes.data, True))


def _image_view(image: sitk.Image) -> NDArray[Any]:
    return np.asarray(_ImageBuffer(image))


def xy_to_rowcol(values_xy: Sequence[float]) -> tuple[float, float]:
    """SimpleITK (x, y) -> numpy (row, col), and back: the only axis flip in sonoseg.

    SimpleITK indexes images as (x=column, y=row[, z]) while ``GetArrayFromImage`` returns
    (..., row, col); nnU-Net's SimpleITKIO does the same reversal. The swap is its own inverse.
    """
    return (float(values_xy[1]), float(values_xy[0]))


# -- public API -----------------------------------------------------------------------------


def read_image(
    path: Path | str,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    budget: DecodeBudget | None = None,
) -> list[LoadedImage]:
    """Read every frame of an image file as grey uint8 (see the module docstring for the rules).

    ``budget`` is the memory budget the decode reserves from; None: the process-wide one.
    """
    with local_source(Path(path), max_bytes) as source:
        return _load_frames(source, max_side, max_decoded_bytes, budget)


def read_image_bytes(
    data: bytes,
    filename_hint: str,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    budget: DecodeBudget | None = None,
) -> list[LoadedImage]:
    """Like :func:`read_image` for downloaded bytes; ``filename_hint`` only names them in errors."""
    with bytes_source(data, filename_hint, max_bytes) as source:
        return _load_frames(source, max_side, max_decoded_bytes, budget)


def read_mask(
    path: Path | str,
    *,
    frame_index: int | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    budget: DecodeBudget | None = None,
) -> NDArray[np.uint8]:
    """Read a label map as uint8 class indices (H, W); values are never rescaled.

    Palette PNGs give their palette indices; a 0/255 binary mask gives 0/1. Lossy JPEG and DICOM
    are refused. A multi-slice segmentation needs ``frame_index`` (or :func:`read_mask_frames`).
    """
    name, labels = _read_labels(Path(path), max_side, max_bytes, max_decoded_bytes, budget)
    if frame_index is None:
        if labels.shape[0] != 1:
            raise InvalidImage(f"{name}: the mask has {labels.shape[0]} slices; pass frame_index")
        frame_index = 0
    if not 0 <= frame_index < labels.shape[0]:
        raise InvalidImage(f"{name}: frame {frame_index} requested, the mask has {labels.shape[0]}")
    mask = np.ascontiguousarray(labels[frame_index]) if labels.shape[0] == 1 else labels[frame_index].copy()
    return _binary_to_class_one(mask)


def read_mask_frames(
    path: Path | str,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    budget: DecodeBudget | None = None,
) -> NDArray[np.uint8]:
    """Every slice of a label map as uint8 class indices (F, H, W), in file order (F = 1 for 2D).

    Slice k is the label map of frame k of the image it belongs to (a 3D NIfTI/MetaImage that
    ITK-SNAP saved for a cine DICOM or a volume). Each slice follows :func:`read_mask`'s rules; the
    0/255 binary rule is applied slice by slice, as ``read_mask(frame_index=k)`` would.
    """
    _, labels = _read_labels(Path(path), max_side, max_bytes, max_decoded_bytes, budget)
    for k in range(labels.shape[0]):
        _binary_to_class_one(labels[k])
    return labels


def _read_labels(
    path: Path, max_side: int, max_bytes: int, max_decoded_bytes: int, budget: DecodeBudget | None
) -> tuple[str, NDArray[np.uint8]]:
    with local_source(path, max_bytes) as source:
        if source.fmt in {"jpeg", "dicom"}:
            raise InvalidImage(
                f"{source.name}: a {source.fmt.upper()} file cannot hold a label map; "
                "use PNG, TIFF, BMP, NIfTI or MetaImage"
            )
        with _decoding(source, max_side, max_decoded_bytes, budget) as decoded:
            labels = _class_indices(source, decoded.pixels)
    return source.name, labels


def _binary_to_class_one(mask: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """A 0/255 binary export means "class 1": divided in place (``mask`` is a fresh array)."""
    if mask.max(initial=0) == 255 and not any(
        np.count_nonzero((block != 0) & (block != 255)) for block in _row_blocks(mask)
    ):
        np.floor_divide(mask, 255, out=mask)
    return mask


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
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def decode_png_bytes(
    data: bytes,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    budget: DecodeBudget | None = None,
) -> NDArray[Any]:
    """Decode PNG bytes as stored: (H, W) grey, (H, W, C) colour, palette PNGs as indices."""
    with bytes_source(data, "PNG data", max_bytes) as source:
        if source.fmt != "png":
            raise InvalidImage(f"{source.name}: expected PNG, got {source.fmt}")
        with _decoding(source, max_side, max_decoded_bytes, budget) as decoded:
            if source.png_colour_type == PNG_PALETTE:
                pixels = np.asarray(_palette_indices(decoded.pixels, png_palette(source), source.name)[0])
            else:
                pixels = np.array(decoded.pixels[0], order="C")  # a copy: the view dies with the block
    return pixels


def decode_peak_bytes(
    fmt: str, size: Sequence[int], components: int, component_bytes: int, *, compressed_dicom_bytes: int | None = None
) -> int:
    """The module docstring's bound ``E x D + S`` for a header: what a decode reserves.

    ``compressed_dicom_bytes``: the file size of a compressed DICOM (None for anything else).
    """
    width = int(size[0])
    frame_pixels = width * (int(size[1]) if len(size) > 1 else 1)
    decoded = int(np.prod(size, dtype=np.int64)) * components * component_bytes
    scratch = SCRATCH_BYTES_PER_PIXEL * min(frame_pixels, max(BLOCK_PIXELS, width))
    if compressed_dicom_bytes is not None:
        return _CODEC_COPIES * decoded + _CODEC_FILE_COPIES * compressed_dicom_bytes + scratch
    return _EXTRA_COPIES.get(fmt, 2) * decoded + scratch


def _compressed_dicom_bytes(source: Source) -> int | None:
    scan = source.dicom_scan
    if source.fmt != "dicom" or (scan is not None and scan.complete and not scan.encapsulated):
        return None
    return source.path.stat().st_size


# -- decoding and conversion -----------------------------------------------------------------


def _itk_reason(exc: RuntimeError, source: Source) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = re.sub(r"^.*?ERROR: \w+\(0x[0-9a-fA-F]+\):\s*", "", lines[-1] if lines else "unknown error")
    return reason.replace(str(source.path), source.name)


@contextmanager
def _decoding(source: Source, max_side: int, max_decoded_bytes: int, budget: DecodeBudget | None) -> Iterator[_Decoded]:
    """Check the header against the limits, reserve the memory bound, decode: (F, H, W[, C]).

    The reservation (:func:`decode_peak_bytes`, from the header alone) is held while the block
    runs; when it ends the view and the image are dropped, so SimpleITK's buffer is freed before
    the bytes go back to the budget.
    """
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
        raise InvalidImage(
            f"{source.name}: unsupported pixel type "
            f"{sitk.GetPixelIDValueAsString(reader.GetPixelID())} with {components} components"
        )
    decoded = int(np.prod(size, dtype=np.int64)) * components * component_bytes
    if decoded > max_decoded_bytes:
        raise InvalidImage(f"{source.name}: {decoded} decoded bytes exceeds the {max_decoded_bytes}-byte limit")
    estimate = decode_peak_bytes(
        source.fmt, size, components, component_bytes, compressed_dicom_bytes=_compressed_dicom_bytes(source)
    )
    with (budget or shared_budget()).reserve(estimate, source.name):
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InvalidImage(f"{source.name}: cannot decode pixels: {_itk_reason(exc, source)}") from exc
        if (
            image.GetSize() != size
            or image.GetNumberOfComponentsPerPixel() != components
            or image.GetPixelID() != reader.GetPixelID()
        ):  # the estimate would not hold
            raise InvalidImage(
                f"{source.name}: decoded {image.GetSize()} x {image.GetNumberOfComponentsPerPixel()} "
                f"{image.GetPixelIDTypeAsString()}, but the header said {size} x {components}"
            )
        pixels = _image_view(image)
        if len(size) == 2:
            pixels = pixels[np.newaxis]
        tags = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()} if source.fmt == "dicom" else {}
        result = _Decoded(pixels, image, tags)
        del pixels, image
        try:
            yield result
        finally:
            result.pixels = result.image = None  # type: ignore[assignment]


def _load_frames(
    source: Source, max_side: int, max_decoded_bytes: int, budget: DecodeBudget | None
) -> list[LoadedImage]:
    with _decoding(source, max_side, max_decoded_bytes, budget) as decoded:
        grey, geometries, metadata, patient = _grey_frames(source, decoded)
    # SimpleITK's buffer is gone; only the uint8 frames are left (orientation may copy one)
    result = []
    for k in range(grey.shape[0]):
        frame = _ORIENT[source.jpeg_orientation](grey[k])
        result.append(
            LoadedImage(np.ascontiguousarray(frame), k, geometries[k], source.fmt, dict(metadata), patient_id=patient)
        )
    logger.debug(
        "read %s: %s, %d frame(s) of %dx%d",
        source.name,
        source.fmt,
        len(result),
        result[0].pixels.shape[1],
        result[0].pixels.shape[0],
    )
    return result


def _grey_frames(
    source: Source, decoded: _Decoded
) -> tuple[NDArray[np.uint8], list[Geometry], dict[str, str], str | None]:
    """The checks that need pixels, grey uint8 (F, H, W) as a fresh array, geometry, metadata, PatientID."""
    pixels, image, tags = decoded.pixels, decoded.image, decoded.tags
    if source.fmt == "jpeg" and pixels.ndim == 4 and pixels.shape[3] == 4:
        raise InvalidImage(f"{source.name}: CMYK JPEGs are not supported; export as RGB or grey")
    regions = source.dicom_scan.regions if source.dicom_scan is not None else ()
    if source.fmt == "dicom":
        frames = dicom.dicom_frame_count(tags)
        if frames is not None and frames != pixels.shape[0]:
            raise InvalidImage(f"{source.name}: NumberOfFrames says {frames}, decoded {pixels.shape[0]}")
    grey = _to_uint8(pixels, _grey_of(pixels), dicom.dicom_window(tags))
    metadata = dicom.kept_metadata(tags, regions) if source.fmt == "dicom" else {}
    geometries = [_geometry(source, image, tags, regions, k) for k in range(grey.shape[0])]
    return grey, geometries, metadata, dicom.patient_id(tags) if source.fmt == "dicom" else None


def _geometry(
    source: Source, image: sitk.Image, tags: Mapping[str, str], regions: tuple[dicom.UltrasoundRegion, ...], k: int
) -> Geometry:
    if source.fmt == "dicom":
        return Geometry(spacing=dicom.dicom_spacing(tags, xy_to_rowcol(image.GetSpacing()), regions))
    if source.fmt not in {"nifti", "metaimage"}:
        return Geometry()
    origin = image.TransformIndexToPhysicalPoint((0, 0, k)) if image.GetDimension() == 3 else image.GetOrigin()
    return Geometry(xy_to_rowcol(image.GetSpacing()), tuple(origin), tuple(image.GetDirection()))


def _blocks(pixels: NDArray[Any]) -> Iterator[tuple[int, slice]]:
    """(frame, rows) of (F, H, W[, C]) pixels in blocks of about :data:`BLOCK_PIXELS` pixels.

    Every conversion below works one block at a time into a preallocated output, so its
    temporaries are bounded by the block, not the file (the ``S`` of the module docstring).
    """
    frames, height, width = pixels.shape[:3]
    step = max(1, BLOCK_PIXELS // max(1, width))
    for f in range(frames):
        for r in range(0, height, step):
            yield f, slice(r, min(height, r + step))


def _row_blocks(a: NDArray[Any]) -> Iterator[NDArray[Any]]:
    """Views of a (H, W) array, block of rows by block of rows."""
    for _, rows in _blocks(a[np.newaxis]):
        yield a[rows]


GreyOf = Callable[[NDArray[Any]], NDArray[Any]]


def _grey_of(pixels: NDArray[Any]) -> GreyOf:
    """How a block of (F, H, W[, C]) pixels becomes grey: as is, channel 0, or BT.601 luma.

    Channel 0 when the file has fewer than 3 channels or all of R, G and B are equal (checked
    over the whole file first, block by block); else the luma, float32 (rows, W) per block.
    """
    if pixels.ndim == 3:
        return lambda block: block
    if pixels.shape[3] < 3 or all(
        np.array_equal(b[..., 0], b[..., 1]) and np.array_equal(b[..., 0], b[..., 2])
        for b in (pixels[f, rows] for f, rows in _blocks(pixels))
    ):
        return lambda block: block[..., 0]
    # The same float32 matmul as on the whole file: per row it gives bit-identical results.
    return lambda block: np.asarray(block[..., :3].astype(np.float32) @ _LUMA_BT601)


def _to_uint8(pixels: NDArray[Any], grey_of: GreyOf, window: tuple[float, float] | None) -> NDArray[np.uint8]:
    """Apply the intensity rule of the module docstring to the whole file, one block at a time."""
    out = np.empty(pixels.shape[:3], dtype=np.uint8)
    if pixels.dtype == np.uint8:  # grey as is, or the luma of 8-bit colour rounded
        for f, rows in _blocks(pixels):
            grey = grey_of(pixels[f, rows])
            if grey.dtype != np.uint8:
                np.rint(grey, out=grey)
                np.clip(grey, 0, 255, out=grey)
            out[f, rows] = grey
        return out
    low = high = 0.0
    if window is None:  # min-max over the whole file: a first pass over the same blocks
        lows: list[float] = []
        highs: list[float] = []
        for f, rows in _blocks(pixels):
            grey = grey_of(pixels[f, rows])
            if grey.dtype.kind in "iub":  # exact: rounding to float32 is monotonic
                lows.append(float(np.float32(grey.min())))
                highs.append(float(np.float32(grey.max())))
                continue
            values = np.asarray(grey, dtype=np.float32)  # float64 beyond float32's range is inf, as before
            finite = np.isfinite(values)
            if finite.any():
                lows.append(float(np.min(values, where=finite, initial=np.inf)))
                highs.append(float(np.max(values, where=finite, initial=-np.inf)))
        if lows:
            low, high = min(lows), max(highs)
    for f, rows in _blocks(pixels):
        grey = grey_of(pixels[f, rows])
        values = (
            grey
            if grey.dtype == np.float32 and not np.may_share_memory(grey, pixels)
            else np.array(grey, dtype=np.float32)
        )  # float32, and ours to overwrite
        if window is not None:  # DICOM PS3.3 C.11.2.1.2.1, linear VOI function
            center, width = window
            values -= center - 0.5
            values /= width - 1.0
            values += 0.5
            values *= 255.0
        elif high > low:
            np.nan_to_num(values, copy=False, nan=low, posinf=high, neginf=low)
            values -= low
            values *= 255.0 / (high - low)
        else:
            values[...] = 0.0
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        out[f, rows] = values
    return out


# EXIF orientation (CIPA DC-008 tag 0x0112) -> the numpy operation that makes the frame upright.
_ORIENT: Mapping[int, Callable[[NDArray[Any]], NDArray[Any]]] = MappingProxyType(
    {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.T,
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].T,
        8: lambda a: np.rot90(a, 1),
    }
)


# -- label maps --------------------------------------------------------------------------------


def _class_indices(source: Source, pixels: NDArray[Any]) -> NDArray[np.uint8]:
    """(F, H, W[, C]) decoded label pixels -> uint8 class indices (F, H, W), never rescaled."""
    if source.png_colour_type == PNG_PALETTE:
        return _palette_indices(pixels, png_palette(source), source.name)
    if pixels.ndim == 4:
        channels = pixels[..., : min(3, pixels.shape[3])]
        if not all(
            np.array_equal(block[..., 0], block[..., c])
            for block in (channels[f, rows] for f, rows in _blocks(channels))
            for c in range(channels.shape[3])
        ):
            raise InvalidImage(f"{source.name}: a colour mask without a palette cannot be mapped to classes")
        pixels = channels[..., 0]
    out = np.empty(pixels.shape, dtype=np.uint8)
    lows: list[Any] = []  # numpy scalars of the label dtype, as the error message shows them
    highs: list[Any] = []
    for f, rows in _blocks(pixels):
        block = pixels[f, rows]
        if pixels.dtype.kind == "f" and (not np.all(np.isfinite(block)) or not np.array_equal(block, np.round(block))):
            raise InvalidImage(f"{source.name}: label values must be whole numbers")
        lows.append(block.min())
        highs.append(block.max())
        out[f, rows] = block  # unsafe cast; refused below when out of range
    low, high = (min(lows), max(highs)) if lows else (0, 0)
    if low < 0 or high > 255:
        raise InvalidImage(f"{source.name}: label values must lie in 0..255, found {low}..{high}")
    return out


def _palette_indices(rgb: NDArray[Any], palette: NDArray[np.uint8], name: str) -> NDArray[np.uint8]:
    """Undo SimpleITK's palette expansion: map each RGB(A) pixel back to its palette index.

    (F, H, W, C) -> (F, H, W), one block of rows at a time.
    """

    def pack(c: NDArray[Any]) -> NDArray[Any]:
        return np.asarray((c[..., 0].astype(np.uint32) << 16) | (c[..., 1].astype(np.uint32) << 8) | c[..., 2])

    palette_keys = pack(palette)
    order = np.argsort(palette_keys, kind="stable")
    sorted_keys = palette_keys[order]
    colours, counts = np.unique(palette_keys, return_counts=True)
    shared = colours[counts > 1]  # colours given to several indices
    out = np.empty(rgb.shape[:3], dtype=np.uint8)
    ambiguous = False
    for f, rows in _blocks(rgb):
        keys = pack(rgb[f, rows])
        ranks = np.minimum(np.searchsorted(sorted_keys, keys), len(order) - 1)
        if not np.array_equal(sorted_keys[ranks], keys):
            raise InvalidImage(f"{name}: decoded colours do not match the PNG palette")
        ambiguous = ambiguous or (shared.size > 0 and bool(np.isin(keys, shared).any()))
        out[f, rows] = order[ranks]
    if ambiguous:
        raise InvalidImage(f"{name}: the palette gives one colour to several used indices; indices are ambiguous")
    return out


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

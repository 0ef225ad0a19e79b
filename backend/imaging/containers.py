"""Image containers before any pixel is decoded: format sniffing, size limits and completeness.

The format comes from a file's first bytes, never from its name (which only has to carry a
known extension; DICOM is accepted under any name). Truncation is detected per format (PNG IEND,
JPEG EOI, BMP/NIfTI/MetaImage sizes, DICOM element walk) because several SimpleITK readers
silently return partial pixels. A file that passes becomes a :class:`Source` for
:mod:`backend.imaging.io` to decode; every failure is :class:`~backend.errors.InvalidImage`.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

import numpy as np
from numpy.typing import NDArray

from backend.errors import InvalidImage, NotFound
from backend.imaging import dicom

logger = logging.getLogger(__name__)

MiB = 1024 * 1024

_EXTENSIONS: Mapping[str, str] = MappingProxyType(
    {
        ".png": "png",
        ".jpg": "jpeg",
        ".jpeg": "jpeg",
        ".tif": "tiff",
        ".tiff": "tiff",
        ".bmp": "bmp",
        ".dcm": "dicom",
        ".dicom": "dicom",
        ".nii": "nifti",
        ".nii.gz": "nifti",
        ".mha": "metaimage",
        ".mhd": "metaimage",
    }
)
_METAIO_TYPE_BYTES: Mapping[str, int] = MappingProxyType(
    {
        "MET_CHAR": 1,
        "MET_UCHAR": 1,
        "MET_SHORT": 2,
        "MET_USHORT": 2,
        "MET_INT": 4,
        "MET_UINT": 4,
        "MET_LONG": 4,
        "MET_ULONG": 4,
        "MET_LONG_LONG": 8,
        "MET_ULONG_LONG": 8,
        "MET_FLOAT": 4,
        "MET_DOUBLE": 8,
    }
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
PNG_PALETTE, _PNG_GREY_ALPHA = 3, 4
_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Source:
    """A file that passed the container checks and is ready for SimpleITK."""

    path: Path
    name: str
    fmt: str
    png_colour_type: int | None = None
    jpeg_orientation: int = 1
    dicom_scan: dicom.DicomScan | None = None


# -- sources: limits, sniffing, container checks ---------------------------------------------


def _extension(name: str) -> str:
    lower = name.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


def _sniff(head: bytes) -> tuple[str | None, bool]:
    """(format, gzip) from the first bytes; the name is never consulted."""
    if head.startswith(PNG_SIGNATURE):
        return "png", False
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg", False
    if head[:4] in {b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"}:
        return "tiff", False
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp", False
    if head[128:132] == b"DICM":
        return "dicom", False
    if head.startswith(b"\x1f\x8b"):
        try:
            inner = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(head, 1024)
        except zlib.error:
            return None, True
        return ("nifti" if _is_nifti(inner) else None), True
    if _is_nifti(head):
        return "nifti", False
    if re.match(rb"\s*[A-Za-z]+\s*=", head) and b"ElementDataFile" in head:  # MetaIO "Key = Value" text
        return "metaimage", False
    return None, False


def _is_nifti(head: bytes) -> bool:
    return (len(head) >= 348 and head[344:348] == b"n+1\x00") or head[4:8] == b"n+2\x00"


def _check_limits(name: str, size: int, max_bytes: int) -> None:
    if size == 0:
        raise InvalidImage(f"{name}: the file is empty")
    if size > max_bytes:
        raise InvalidImage(f"{name}: {size} bytes is over the {max_bytes}-byte limit")


@contextmanager
def local_source(path: Path, max_bytes: int) -> Iterator[Source]:
    """A file on disk, checked; NIfTI under a wrong name goes through a renamed temp copy."""
    if not path.is_file():
        raise NotFound(f"{path.name}: no such file")
    name, size = path.name, path.stat().st_size
    _check_limits(name, size, max_bytes)
    with path.open("rb") as f:
        head = f.read(_HEAD_BYTES)
    fmt, gz = _sniff(head)
    ext = _extension(name)
    if ext not in _EXTENSIONS and fmt != "dicom":
        raise InvalidImage(
            f"{name}: unsupported extension {ext or '(none)'!r}; expected one of {', '.join(sorted(_EXTENSIONS))}"
        )
    if fmt == "nifti" and ext != (".nii.gz" if gz else ".nii"):  # the NIfTI reader trusts names
        logger.info("%s: NIfTI content under a %r name; reading a renamed copy", name, ext)
        with _temporary_file(path.read_bytes(), ".nii.gz" if gz else ".nii") as tmp:
            yield _inspect(tmp, name, fmt, head, max_bytes, allow_detached=False)
        return
    yield _inspect(path, name, fmt, head, max_bytes, allow_detached=True)


@contextmanager
def bytes_source(data: bytes, hint: str, max_bytes: int) -> Iterator[Source]:
    """Downloaded bytes, written to a temp file whose suffix comes from the content, not the hint."""
    name = hint[-200:] or "download"
    _check_limits(name, len(data), max_bytes)
    fmt, gz = _sniff(data[:_HEAD_BYTES])
    # NIfTI: ITK trusts the name, so plain NIfTI needs ".nii" (".nifti" is "not recognized")
    suffix = (
        ".nii.gz" if fmt == "nifti" and gz else {"nifti": ".nii", "metaimage": ".mha", None: ".bin"}.get(fmt, f".{fmt}")
    )
    with _temporary_file(data, suffix) as tmp:
        yield _inspect(tmp, name, fmt, data[:_HEAD_BYTES], max_bytes, allow_detached=False)


@contextmanager
def _temporary_file(data: bytes, suffix: str) -> Iterator[Path]:
    # delete=False: SimpleITK reopens the file by name after we close it; the finally removes it.
    handle = tempfile.NamedTemporaryFile(prefix="sonoseg-", suffix=suffix, delete=False)  # noqa: SIM115
    try:
        with handle:
            handle.write(data)
        yield Path(handle.name)
    finally:
        os.unlink(handle.name)


def _inspect(path: Path, name: str, fmt: str | None, head: bytes, max_bytes: int, *, allow_detached: bool) -> Source:
    """Format-specific checks that need no pixel decoding."""
    if fmt is None:
        raise InvalidImage(
            f"{name}: not an image (its content matches none of PNG, JPEG, TIFF, BMP, DICOM, NIfTI, MetaImage)"
        )
    size = path.stat().st_size
    with path.open("rb") as f:
        if fmt == "png":
            return Source(path, name, fmt, png_colour_type=_check_png(f, size, head, name))
        if fmt == "jpeg":
            return Source(path, name, fmt, jpeg_orientation=_check_jpeg(f.read(), name))
        if fmt == "tiff":
            _check_tiff(f, size, name)
        elif fmt == "bmp":
            _check_bmp(head, size, name)
        elif fmt == "dicom":
            try:
                return Source(path, name, fmt, dicom_scan=dicom.scan_dicom(f, size))
            except dicom.DicomStructureError as exc:
                raise InvalidImage(f"{name}: invalid DICOM: {exc.reason}") from exc
        elif fmt == "nifti":
            _check_nifti(f, size, name)
        elif fmt == "metaimage":
            _check_metaimage(head, path, size, name, max_bytes, allow_detached)
    return Source(path, name, fmt)


def _check_png(f: BinaryIO, size: int, head: bytes, name: str) -> int:
    if head[12:16] != b"IHDR" or len(head) < 33:
        raise InvalidImage(f"{name}: PNG without an IHDR header")
    f.seek(max(0, size - _HEAD_BYTES))
    if _PNG_IEND not in f.read():
        raise InvalidImage(f"{name}: the PNG is truncated (no IEND chunk at the end)")
    colour_type = head[25]
    if colour_type == _PNG_GREY_ALPHA:
        raise InvalidImage(f"{name}: grey+alpha PNGs are not supported; re-export as grey or RGBA")
    return colour_type


def _check_jpeg(data: bytes, name: str) -> int:
    """Reject a JPEG cut short (libjpeg pads it with grey) and return its EXIF orientation."""
    # Entropy-coded data never contains FFD9/FFDA, so the last scan must be followed by an EOI.
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise InvalidImage(f"{name}: the JPEG is truncated (no end-of-image marker after the last scan)")
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xDA, 0xD9):
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _exif_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of EXIF IFD0 (1-8), or 1 when absent or malformed."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    count = struct.unpack(order + "H", tiff[ifd : ifd + 2])[0] if ifd + 2 <= len(tiff) else 0
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
        if tag == 0x0112 and kind == 3:  # SHORT
            (value,) = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


_TIFF_MAX_PAGES = 65535  # ITK counts pages in 16 bits
_TIFF_REDUCED_OR_MASK = 1 | 4  # NewSubfileType bits: reduced-resolution copy, transparency mask


def _check_tiff(f: BinaryIO, size: int, name: str) -> None:
    """Walk the IFD chain as libtiff does and refuse the page layouts ITK's reader overflows on.

    ITK sizes a multi-page volume by counting pages whose NewSubfileType is 0 (if any is) and
    skips reduced-resolution/mask pages, but then writes page k at offset k: a mix of subfile
    types 0 and 2, or a thumbnail before the frames, wrote past the pixel buffer (heap
    corruption, found by fuzz/fuzz_image_readers.py). It also stacks every page at the first
    page's size. So a multi-page TIFF must be uniform: one subfile kind, no reduced or mask
    pages, one width/height/bit depth/sample count; and every directory must be readable.
    """
    f.seek(0)
    header = f.read(16)
    order = "<" if header[:2] == b"II" else ">"
    big = header[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte counts and offsets
    if len(header) < (16 if big else 8):
        raise InvalidImage(f"{name}: the TIFF is truncated (incomplete header)")
    count_fmt, entry_size, offset_fmt = (order + "Q", 20, order + "Q") if big else (order + "H", 12, order + "I")
    offset = struct.unpack(offset_fmt, header[8:16] if big else header[4:8])[0]
    pages: list[tuple[int | None, tuple[int | None, ...]]] = []
    seen: set[int] = set()
    while offset:
        if offset in seen or len(pages) >= _TIFF_MAX_PAGES:
            raise InvalidImage(f"{name}: the TIFF directory chain loops or has over {_TIFF_MAX_PAGES} pages")
        seen.add(offset)
        count = 0
        if offset < size:  # an offset past the end (up to 2**64 in BigTIFF) is no directory
            f.seek(offset)
            raw_count = f.read(struct.calcsize(count_fmt))
            count = struct.unpack(count_fmt, raw_count)[0] if len(raw_count) == struct.calcsize(count_fmt) else 0
        table = f.read(count * entry_size + struct.calcsize(offset_fmt)) if 0 < count <= 4096 else b""
        if len(table) != count * entry_size + struct.calcsize(offset_fmt) or count == 0:
            raise InvalidImage(
                f"{name}: TIFF directory {len(pages) + 1} at byte {offset} is empty, truncated or corrupt"
            )
        tags: dict[int, int | None] = {}
        for at in range(0, count * entry_size, entry_size):
            tag, kind = struct.unpack(order + "HH", table[at : at + 4])
            (values,) = struct.unpack(order + ("Q" if big else "I"), table[at + 4 : at + (12 if big else 8)])
            value = table[at + (12 if big else 8) : at + entry_size]
            width = {3: 2, 4: 4, 16: 8}.get(kind)  # SHORT, LONG, LONG8: the one-value forms we read
            if values == 1 and width:
                tags[tag] = int.from_bytes(value[:width], "little" if order == "<" else "big")
            else:  # several values (e.g. RGB bits per sample) stay at an offset: compare their count
                tags[tag] = -values
        offset = struct.unpack(offset_fmt, table[-struct.calcsize(offset_fmt) :])[0]
        pages.append((tags.get(254), tuple(tags.get(t) for t in (256, 257, 258, 277))))
    if len(pages) > 1:
        kinds = {subfile for subfile, _ in pages}
        if any(subfile is not None and subfile & _TIFF_REDUCED_OR_MASK for subfile in kinds):
            raise InvalidImage(
                f"{name}: a multi-page TIFF with reduced-resolution or mask pages is not supported; "
                "export the frames only"
            )
        if 0 in kinds and len(kinds) > 1:
            raise InvalidImage(
                f"{name}: the TIFF pages mix subfile types {sorted(kinds, key=str)}; export all frames alike"
            )
        if len({geometry for _, geometry in pages}) > 1:
            raise InvalidImage(
                f"{name}: the TIFF pages differ in size, bit depth or samples per pixel; all frames must be alike"
            )


def _check_bmp(head: bytes, size: int, name: str) -> None:
    """Uncompressed BMPs must hold every row (ITK's reader fills missing rows with zeros)."""
    if len(head) < 34:
        raise InvalidImage(f"{name}: the BMP is truncated (incomplete header)")
    offset, info_size, width, height, _, bits, compression = struct.unpack("<IIiiHHI", head[10:34])
    if info_size >= 40 and compression in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS
        needed = offset + ((width * bits + 31) // 32) * 4 * abs(height)
        if size < needed:
            raise InvalidImage(f"{name}: the BMP is truncated ({size} of {needed} bytes)")


def _check_nifti(f: BinaryIO, size: int, name: str) -> None:
    """The voxel block must be complete (ITK's NIfTI reader returns partial data silently)."""
    gz = f.read(2) == b"\x1f\x8b"
    f.seek(0)
    try:
        header = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(f.read(4096), 540) if gz else f.read(540)
        if header[4:8] == b"n+2\x00":
            e = "<" if struct.unpack("<i", header[:4])[0] == 540 else ">"
            (bitpix,) = struct.unpack(e + "h", header[14:16])
            dims, vox_offset = struct.unpack(e + "8q", header[16:80]), struct.unpack(e + "q", header[168:176])[0]
        else:
            e = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            (bitpix,) = struct.unpack(e + "h", header[72:74])
            dims, vox_offset = struct.unpack(e + "8h", header[40:56]), int(struct.unpack(e + "f", header[108:112])[0])
    except (struct.error, zlib.error, ValueError, OverflowError) as exc:  # ValueError/OverflowError: NaN/inf vox_offset
        raise InvalidImage(f"{name}: the NIfTI header is truncated or corrupt") from exc
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : dims[0] + 1]):
        raise InvalidImage(f"{name}: malformed NIfTI header")
    needed = vox_offset + int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64)) * bitpix // 8
    available = size
    if gz:
        f.seek(size - 4)
        gzip_isize = struct.unpack("<I", f.read(4))[0]  # length mod 2**32 of the last member
        f.seek(0)
        available = needed if gzip_isize == needed % 2**32 else _gunzipped_length(f, needed, name)
    if available < needed:
        raise InvalidImage(f"{name}: the NIfTI file is truncated ({available} of {needed} bytes)")


def _gunzipped_length(f: BinaryIO, stop_at: int, name: str) -> int:
    """Decompressed length of a (multi-member) gzip stream, counting no further than ``stop_at``."""
    total, inflater, pending = 0, zlib.decompressobj(zlib.MAX_WBITS | 16), b""
    try:
        while total < stop_at:
            if not pending and not (pending := f.read(MiB)):
                break
            if inflater.eof:
                if not pending.strip(b"\x00"):  # zero padding after the last member
                    pending = b""
                    continue
                inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            total += len(inflater.decompress(pending, 16 * MiB))
            pending = inflater.unconsumed_tail or (inflater.unused_data if inflater.eof else b"")
    except zlib.error as exc:
        raise InvalidImage(f"{name}: corrupt gzip data ({exc})") from exc
    return total


def _check_metaimage(head: bytes, path: Path, size: int, name: str, max_bytes: int, allow_detached: bool) -> None:
    """Keep ``ElementDataFile`` next to its header, within limits and complete."""
    fields: dict[str, str] = {}
    dims: list[str] = []
    header_end = 0
    for line in head.split(b"\n"):
        header_end += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip().lower() == "ndims":
            dims.append(value.strip())
        if key.strip() == "ElementDataFile":
            break
    # MetaIO sizes fixed arrays by NDims without a bound: NDims = 100 corrupted the heap, -1 or
    # 10**17 crashed or hung the reader (found by fuzz/fuzz_image_readers.py). sonoseg reads 2D/3D.
    if not dims or not all(v.isascii() and v.isdigit() and int(v) in (2, 3) for v in dims):
        raise InvalidImage(f"{name}: MetaImage NDims must be 2 or 3, got {', '.join(dims)[:40] or 'none'}")
    data_file = fields.get("ElementDataFile", "")
    if data_file == "LOCAL":
        data_path, available = None, size - header_end
    elif not allow_detached:
        raise InvalidImage(f"{name}: MetaImage data in a separate file ({data_file!r}); send a single .mha")
    elif not data_file or data_file != Path(data_file).name or data_file in {".", "..", "LIST"} or " " in data_file:
        raise InvalidImage(f"{name}: ElementDataFile {data_file!r} must name one file beside the header")
    else:
        data_path = path.parent / data_file
        if not data_path.is_file():
            raise InvalidImage(f"{name}: its data file {data_file!r} does not exist")
        available = data_path.stat().st_size
        _check_limits(name, size + available, max_bytes)
    try:
        voxels = int(np.prod([int(v) for v in fields["DimSize"].split()], dtype=object))  # no int64 wrap-around
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        needed = (
            int(fields["CompressedDataSize"])
            if fields.get("CompressedData", "False").lower() == "true"
            else voxels * channels * _METAIO_TYPE_BYTES[fields["ElementType"]]
        )
    except (KeyError, ValueError):
        return  # unusual header: SimpleITK judges it
    if needed < 0:  # a negative CompressedDataSize (or an overflowing DimSize) makes MetaIO allocate ~2**64
        raise InvalidImage(f"{name}: the MetaImage header gives a negative data size ({needed})")
    if "HeaderSize" not in fields and available < needed:
        raise InvalidImage(f"{name}: the MetaImage data is truncated ({available} of {needed} bytes)")


# -- chunks the decoder needs --------------------------------------------------------------------


def png_palette(source: Source) -> NDArray[np.uint8]:
    """The PLTE chunk as (N, 3) uint8 (it must come before the first IDAT)."""
    with source.path.open("rb") as f:
        f.seek(len(PNG_SIGNATURE))
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"PLTE" and length % 3 == 0:
                return np.frombuffer(f.read(length), dtype=np.uint8).reshape(-1, 3)
            if kind in {b"IDAT", b"IEND"}:
                break
            f.seek(length + 4, os.SEEK_CUR)
    raise InvalidImage(f"{source.name}: palette PNG without a valid PLTE chunk")

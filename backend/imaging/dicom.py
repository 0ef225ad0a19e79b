"""DICOM specifics: the de-identification contract, a structural scan, and calibration.

De-identification contract
--------------------------
sonoseg never returns, logs or stores a DICOM attribute unless it is in :data:`KEPT_DICOM_TAGS`.
The allow-list is, exactly:

| Keyword                   | Tag        | Why it is kept                                              |
|---------------------------|------------|-------------------------------------------------------------|
| Modality                  | 0008,0060  | "US"; lets a data team filter out non-ultrasound files      |
| Manufacturer              | 0008,0070  | scanner vendor; image statistics differ by vendor           |
| ManufacturerModelName     | 0008,1090  | scanner model, same reason                                  |
| FrameTime                 | 0018,1063  | milliseconds between cine frames                            |
| NumberOfFrames            | 0028,0008  | cine length                                                 |
| Rows                      | 0028,0010  | image height in pixels                                      |
| Columns                   | 0028,0011  | image width in pixels                                       |
| PhotometricInterpretation | 0028,0004  | how colour was stored (MONOCHROME2, RGB, YBR_FULL_422, ...) |
| PixelSpacing              | 0028,0030  | row and column spacing in mm, when the scanner wrote it     |
| BurnedInAnnotation        | 0028,0301  | YES means the *pixels* may show text such as a name         |
| WindowCenter              | 0028,1050  | display window, used to map 16-bit pixels to 8 bits         |
| WindowWidth               | 0028,1051  | same                                                        |
| PhysicalDeltaX            | 0018,602C  | cm per pixel along x, from SequenceOfUltrasoundRegions      |
| PhysicalDeltaY            | 0018,602E  | (0018,6011), only when all 2D tissue regions agree          |

Everything else is dropped, in particular patient name, id, birth date and sex, accession
number, institution and station names, referring/performing physicians, all dates and times,
all UIDs, device serial numbers and every private tag. Values are stripped of padding and cut
at 64 characters. **Pixels are not scrubbed:** a file with BurnedInAnnotation = YES (or an
unset tag on an older scanner) may show identifying text inside the image itself.
The one exception is :func:`patient_id`: the importer reads PatientID to group one patient's
files into one subject, and keeps only its keyed pseudonym.

The structural scan (:func:`scan_dicom`) walks the element headers of a Part-10 file without
decoding pixels, so that a file with no pixel data or one cut short is rejected with a clear
reason instead of GDCM's generic "Cannot read requested file", and so that the ultrasound
calibration inside SequenceOfUltrasoundRegions (which GDCM does not expose) can be read.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import BinaryIO

logger = logging.getLogger(__name__)

#: SimpleITK/GDCM metadata key ("gggg|eeee", lower-case hex) -> DICOM keyword.
KEPT_DICOM_TAGS: Mapping[str, str] = MappingProxyType(
    {
        "0008|0060": "Modality",
        "0008|0070": "Manufacturer",
        "0008|1090": "ManufacturerModelName",
        "0018|1063": "FrameTime",
        "0028|0008": "NumberOfFrames",
        "0028|0010": "Rows",
        "0028|0011": "Columns",
        "0028|0004": "PhotometricInterpretation",
        "0028|0030": "PixelSpacing",
        "0028|0301": "BurnedInAnnotation",
        "0028|1050": "WindowCenter",
        "0028|1051": "WindowWidth",
        "0018|602c": "PhysicalDeltaX",
        "0018|602e": "PhysicalDeltaY",
    }
)

_MAX_VALUE_CHARS = 64
_MAX_SEQUENCE_DEPTH = 16
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_PIXEL_DATA_TAGS = frozenset({(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)})
_REGIONS_TAG = (0x0018, 0x6011)
# Explicit-VR encodings whose length field is 4 bytes (after 2 reserved bytes).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
# The 2-byte-length VRs. An unknown VR of two capital letters (a future one, PS3.5 6.2) has the
# long form, as GDCM reads it; VR bytes that are not letters make GDCM re-read the data set as
# implicit VR, taking 4 other bytes as a length. Either way a scan that read 2 bytes instead
# passed files whose bogus 32-bit length GDCM allocated (up to 4 GiB for an 800-byte file)
# before failing, so the first kind is read long and the second refused (fuzz/fuzz_image_readers.py).
_SHORT_VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FL",
        b"FD",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)
_IMPLICIT_LE = "1.2.840.10008.1.2"
_Elements = dict[tuple[int, int], bytes]  # (group, element) -> raw value
_BIG_ENDIAN, _DEFLATED = "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
_UNITS_CM = 3  # PhysicalUnitsX/YDirection code for centimetres
_SPATIAL_2D = 1  # RegionSpatialFormat code for a 2D tissue region


class DicomStructureError(Exception):
    """Internal: the scan found a structural defect; ``reason`` is user-facing."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of SequenceOfUltrasoundRegions; deltas are in the units the codes name."""

    spatial_format: int | None
    units_x: int | None
    units_y: int | None
    delta_x: float | None
    delta_y: float | None


@dataclass(frozen=True)
class DicomScan:
    """What the header walk learnt. ``complete`` is False when the syntax cannot be walked.

    ``encapsulated``: the pixel data are compressed fragments; GDCM's codecs then hold several
    copies while decoding, which the memory estimate of :mod:`backend.imaging.io` must know.
    """

    complete: bool
    regions: tuple[UltrasoundRegion, ...] = ()
    encapsulated: bool = False


class _Cursor:
    """Bounded reads over a seekable stream: running past ``size`` means the file is truncated."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self.size = size
        self.pos = stream.tell()
        self.order = "<"  # ">" after the meta group of an explicit VR big-endian file

    def read(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise DicomStructureError("the file is truncated (an element runs past the end of the file)")
        data = self._stream.read(n)
        if len(data) != n:
            raise DicomStructureError("the file is truncated")
        self.pos += n
        return data

    def peek(self, n: int) -> bytes:
        data = self._stream.read(n)
        self._stream.seek(self.pos)
        return data

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise DicomStructureError("the file is truncated (an element runs past the end of the file)")
        self.pos += n
        self._stream.seek(self.pos)


def _read_header(cur: _Cursor, implicit: bool) -> tuple[tuple[int, int], bytes | None, int]:
    group, element = struct.unpack(cur.order + "HH", cur.read(4))
    if group == 0xFFFE or implicit:  # item/delimiter tags never carry a VR
        return (group, element), None, struct.unpack(cur.order + "I", cur.read(4))[0]
    vr = cur.read(2)
    if vr not in _SHORT_VRS and vr not in _LONG_VRS and not (vr.isalpha() and vr.isupper()):
        raise DicomStructureError(f"element ({group:04X},{element:04X}) has an invalid value representation {vr!r}")
    if vr not in _SHORT_VRS:  # the long VRs, and unknown ones (PS3.5 6.2), as GDCM reads them
        cur.skip(2)
        return (group, element), vr, struct.unpack(cur.order + "I", cur.read(4))[0]
    return (group, element), vr, struct.unpack(cur.order + "H", cur.read(2))[0]


def _walk_items(cur: _Cursor, length: int, implicit: bool, depth: int, collect: list[_Elements] | None) -> None:
    """Walk a sequence's items (defined or undefined length); optionally collect item elements."""
    if depth > _MAX_SEQUENCE_DEPTH:
        raise DicomStructureError(f"sequences nested deeper than {_MAX_SEQUENCE_DEPTH} levels")
    end = None if length == _UNDEFINED else cur.pos + length
    while end is None or cur.pos < end:
        tag, _, item_length = _read_header(cur, implicit=True)
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise DicomStructureError(f"unexpected tag ({tag[0]:04X},{tag[1]:04X}) inside a sequence")
        values: _Elements | None = {} if collect is not None else None
        _walk_elements(cur, item_length, implicit, depth + 1, values)
        if collect is not None and values is not None:
            collect.append(values)


def _walk_elements(cur: _Cursor, length: int, implicit: bool, depth: int, values: _Elements | None) -> None:
    """Walk the elements of one sequence item, keeping short values when ``values`` is given."""
    end = None if length == _UNDEFINED else cur.pos + length
    while end is None or cur.pos < end:
        tag, vr, elem_length = _read_header(cur, implicit)
        if tag == _ITEM_END:
            return
        if vr == b"SQ" or elem_length == _UNDEFINED:
            _walk_items(cur, elem_length, implicit or vr == b"UN", depth, None)
        elif values is not None and elem_length <= 16:
            values[tag] = cur.read(elem_length)
        else:
            cur.skip(elem_length)


def _region_from(values: _Elements) -> UltrasoundRegion:
    def ushort(element: int) -> int | None:
        raw = values.get((0x0018, element))
        return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None

    def double(element: int) -> float | None:
        raw = values.get((0x0018, element))
        return struct.unpack("<d", raw)[0] if raw is not None and len(raw) == 8 else None

    return UltrasoundRegion(ushort(0x6012), ushort(0x6024), ushort(0x6026), double(0x602C), double(0x602E))


def scan_dicom(stream: BinaryIO, size: int) -> DicomScan:
    """Walk a Part-10 file's element headers (pixels are skipped, never decoded).

    Raises :class:`DicomStructureError` for a missing pixel data element or a truncated file.
    Big-endian files are walked too, but reported ``complete=False`` (GDCM decodes them like a
    compressed file); deflated ones are refused, since their elements cannot be checked without
    inflating them and GDCM allocated whatever length a forged element claimed.
    """
    stream.seek(0)
    cur = _Cursor(stream, size)
    cur.skip(128)
    if cur.read(4) != b"DICM":
        raise DicomStructureError("no DICM marker at byte 128 (not a DICOM Part-10 file)")
    syntax = ""
    while cur.pos + 4 <= size and cur.peek(2) == b"\x02\x00":  # group 0002: explicit VR LE
        tag, _, length = _read_header(cur, implicit=False)
        if tag == (0x0002, 0x0010):
            syntax = cur.read(length).rstrip(b"\x00 ").decode("ascii", "replace")
        else:
            cur.skip(length)
    if syntax == _DEFLATED:  # GDCM would inflate and parse it unchecked (see _SHORT_VRS): refused
        raise DicomStructureError(
            "the deflated transfer syntax is not supported; re-export the file uncompressed or JPEG-compressed"
        )
    if syntax == _BIG_ENDIAN:  # walked like the others (every length checked), then left to GDCM
        cur.order = ">"
    implicit = syntax == _IMPLICIT_LE
    has_pixels = encapsulated = False
    raw_regions: list[_Elements] = []
    while cur.pos < size:
        tag, vr, length = _read_header(cur, implicit)
        if tag in _PIXEL_DATA_TAGS:
            if length == _UNDEFINED:  # encapsulated (compressed) frames: walk the fragments
                _walk_items_raw(cur)
                encapsulated = True
            else:
                cur.skip(length)
            has_pixels = True
            _check_trailing(cur, implicit)
            break  # only signatures and padding may follow; vendors leave odd bytes there
        elif tag == _REGIONS_TAG:
            _walk_items(cur, length, implicit or vr == b"UN", 1, raw_regions)
        elif vr == b"SQ" or length == _UNDEFINED:
            _walk_items(cur, length, implicit or vr == b"UN", 1, None)
        else:
            cur.skip(length)
    if not has_pixels:
        raise DicomStructureError("it has no pixel data (a report, presentation state or other non-image object)")
    if syntax == _BIG_ENDIAN:  # GDCM byte-swaps it: decoded like a compressed file (io's estimate)
        return DicomScan(complete=False)
    return DicomScan(complete=True, regions=tuple(_region_from(v) for v in raw_regions), encapsulated=encapsulated)


def _check_trailing(cur: _Cursor, implicit: bool) -> None:
    """Refuse an element after the pixel data that claims more bytes than the file has left.

    GDCM parses those bytes as elements too and allocates each one's length before reading
    it: a few bytes of garbage there made it allocate up to 4 GiB (found by
    fuzz/fuzz_image_readers.py). Items and sequences are descended, not skipped.
    """
    while cur.size - cur.pos >= 8:  # fewer: odd padding, which GDCM judges (it reads no length from it)
        tag, vr, length = _read_header(cur, implicit)
        if tag[0] == 0xFFFE or vr == b"SQ" or length == _UNDEFINED:
            continue
        left = cur.size - cur.pos
        if length > left:
            raise DicomStructureError(
                f"an element after the pixel data, ({tag[0]:04X},{tag[1]:04X}), "
                f"claims {length} bytes but only {left} are left in the file"
            )
        cur.skip(length)


def _walk_items_raw(cur: _Cursor) -> None:
    """Skip encapsulated pixel data: raw fragments up to the sequence delimiter."""
    while True:
        tag, _, length = _read_header(cur, implicit=True)
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise DicomStructureError("malformed encapsulated pixel data")
        cur.skip(length)


def _consistent_2d_region(regions: tuple[UltrasoundRegion, ...]) -> tuple[float, float] | None:
    """(delta_x, delta_y) in cm shared by all 2D tissue regions, or None when absent or ambiguous."""
    deltas: set[tuple[float, float]] = set()
    for r in regions:
        if r.spatial_format != _SPATIAL_2D or r.units_x != _UNITS_CM or r.units_y != _UNITS_CM:
            continue
        if r.delta_x is not None and r.delta_y is not None and r.delta_x > 0 and r.delta_y > 0:
            deltas.add((r.delta_x, r.delta_y))
    if len(deltas) != 1:
        if deltas:
            logger.debug("ultrasound regions disagree on calibration; spacing left unknown")
        return None
    ((delta_x, delta_y),) = deltas
    return delta_x, delta_y


def kept_metadata(tags: Mapping[str, str], regions: tuple[UltrasoundRegion, ...] = ()) -> dict[str, str]:
    """Filter GDCM metadata (``"gggg|eeee" -> value``) through :data:`KEPT_DICOM_TAGS`."""
    kept: dict[str, str] = {}
    for key, value in tags.items():
        keyword = KEPT_DICOM_TAGS.get(key.lower())
        if keyword is not None:
            kept[keyword] = value.strip(" \x00")[:_MAX_VALUE_CHARS]
    deltas = _consistent_2d_region(regions)
    if deltas is not None:
        kept["PhysicalDeltaX"], kept["PhysicalDeltaY"] = repr(deltas[0]), repr(deltas[1])
    return kept


def dicom_spacing(
    tags: Mapping[str, str], itk_rowcol: tuple[float, float], regions: tuple[UltrasoundRegion, ...]
) -> tuple[float, float] | None:
    """Pixel spacing (row_mm, col_mm): PixelSpacing if written, else the ultrasound region deltas.

    ``itk_rowcol`` is GDCM's spacing already flipped to (row, col); it is only trusted when the
    PixelSpacing tag exists, since GDCM reports 1.0 for "unknown".
    """
    if "0028|0030" in tags:
        return itk_rowcol
    deltas = _consistent_2d_region(regions)
    if deltas is None:
        return None
    return (deltas[1] * 10.0, deltas[0] * 10.0)  # cm -> mm; Y runs down the rows


def dicom_window(tags: Mapping[str, str]) -> tuple[float, float] | None:
    """The first VOI window (center, width), or None when absent, malformed or inverted data.

    MONOCHROME1 files are skipped because GDCM already inverts their values, so the stored
    window no longer describes them.
    """
    if tags.get("0028|0004", "").strip() == "MONOCHROME1":
        return None
    try:
        center = float(tags["0028|1050"].split("\\")[0])
        width = float(tags["0028|1051"].split("\\")[0])
    except (KeyError, ValueError):
        return None
    return (center, width) if width > 1.0 else None


_PATIENT_ID = "0010|0020"


def patient_id(tags: Mapping[str, str]) -> str | None:
    """The raw PatientID (0010,0020), padding stripped; None when absent or blank.

    Outside the de-identification contract on purpose: it is handed to the importer only so that
    it can derive a keyed subject pseudonym (``services.pseudonyms``). It is never part of
    :func:`kept_metadata`, and nothing may store, log or return it.
    """
    value = tags.get(_PATIENT_ID, "").strip(" \x00")
    return value or None


def dicom_frame_count(tags: Mapping[str, str]) -> int | None:
    """NumberOfFrames as an int (None when absent or not a number)."""
    raw = tags.get("0028|0008", "").strip()
    return int(raw) if raw.isdigit() else None

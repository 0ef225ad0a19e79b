"""Sample files for tests/test_imaging.py, generated at test time (no binaries in the repo).

Writers are deliberately independent of ``backend.imaging.io``: SimpleITK and pydicom write the
files, and the few hand-made PNGs are assembled chunk by chunk here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "usgra-seg"  # as in conftest.py

IDENTIFYING = {
    "PatientName": "DOE^JANE^Q",
    "PatientID": "PID-4411-XY",
    "PatientBirthDate": "19630412",
    "InstitutionName": "St Example Regional Hospital",
    "AccessionNumber": "ACC-778899",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyDate": "20240229",
}


def random_grey(shape: Sequence[int], seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=tuple(shape), dtype=dtype)


def write_sitk(
    path: Path,
    array: np.ndarray,
    *,
    vector: bool = False,
    spacing: Sequence[float] | None = None,
    compress: bool = False,
) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing is not None:
        image.SetSpacing(tuple(spacing))
    sitk.WriteImage(image, str(path), compress)
    return path


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(
    ihdr: tuple[int, int, int, int], raw_rows: bytes, extra_chunks: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """A PNG from (width, height, bit depth, colour type) and already-filtered rows."""
    width, height, depth, colour = ihdr
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    for kind, payload in extra_chunks:
        out += _chunk(kind, payload)
    return out + _chunk(b"IDAT", zlib.compress(raw_rows)) + _chunk(b"IEND", b"")


def palette_png(indices: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> bytes:
    """8-bit palette PNG (colour type 3), filter 0 on every row."""
    h, w = indices.shape
    rows = np.zeros((h, w + 1), np.uint8)
    rows[:, 1:] = indices
    plte = bytes(c for rgb in palette for c in rgb)
    return png_bytes((w, h, 8, 3), rows.tobytes(), [(b"PLTE", plte)])


def grey_alpha_png(h: int = 4, w: int = 5) -> bytes:
    rows = np.zeros((h, 2 * w + 1), np.uint8)
    return png_bytes((w, h, 8, 4), rows.tobytes())


def bomb_png(side: int = 30000) -> bytes:
    """A tiny PNG whose header announces side x side grey pixels (only four rows of IDAT follow).

    Decoding it would need side**2 bytes; a reader that trusts the header must refuse it first.
    """
    idat = zlib.compress(b"\x00" * (side + 1) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def tiff_ifd_first(grey: np.ndarray) -> bytes:
    """An uncompressed grey TIFF with its IFD before the pixels (SimpleITK writes it after)."""
    h, w = grey.shape
    entries = [
        (256, 3, w),
        (257, 3, h),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),
        (277, 3, 1),
        (278, 3, h),
        (279, 4, w * h),
    ]
    strip_offset = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        value = strip_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)  # SHORT or LONG
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return out + struct.pack("<I", 0) + np.ascontiguousarray(grey, dtype=np.uint8).tobytes()


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    frames: int | None = None,
    extra: Mapping[str, object] | None = None,
    pixel_data: bool = True,
    implicit: bool = False,
    regions: Sequence[Mapping[str, object]] = (),
    undefined_lengths: bool = False,
) -> Path:
    """An uncompressed ultrasound DICOM, with identifying tags set, written by pydicom.

    ``undefined_lengths`` also adds a nested code sequence and writes every sequence and item
    with undefined length (delimiter items), as many scanners do.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.3.1" if frames else "1.2.840.10008.5.1.4.1.1.6.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "US", "Acme Medical", "Sono 9"
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    colour = photometric in {"RGB", "YBR_FULL"}
    rows, cols = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames:
        ds.NumberOfFrames, ds.FrameTime = frames, 33.3
    if regions:
        items = []
        for region in regions:
            item = Dataset()
            for keyword, value in region.items():
                setattr(item, keyword, value)
            items.append(item)
        ds.SequenceOfUltrasoundRegions = DicomSequence(items)
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    if undefined_lengths:
        modifier, region_code = Dataset(), Dataset()
        modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning = "G-A100", "SRT", "Right"
        region_code.CodeValue, region_code.CodingSchemeDesignator, region_code.CodeMeaning = "T-D0050", "SRT", "Neck"
        region_code.AnatomicRegionModifierSequence = DicomSequence([modifier])
        ds.AnatomicRegionSequence = DicomSequence([region_code])
        for dataset in (ds, region_code, *ds.get("SequenceOfUltrasoundRegions", [])):
            dataset.is_undefined_length_sequence_item = dataset is not ds
            for element in dataset:
                if element.VR == "SQ":
                    element.is_undefined_length = True
    if pixel_data:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def us_region(delta_x_cm: float, delta_y_cm: float, *, spatial_format: int = 1, units: int = 3) -> dict[str, object]:
    return {
        "RegionSpatialFormat": spatial_format,
        "RegionDataType": 1,
        "RegionFlags": 0,
        "RegionLocationMinX0": 0,
        "RegionLocationMinY0": 0,
        "RegionLocationMaxX1": 5,
        "RegionLocationMaxY1": 3,
        "PhysicalUnitsXDirection": units,
        "PhysicalUnitsYDirection": units,
        "PhysicalDeltaX": delta_x_cm,
        "PhysicalDeltaY": delta_y_cm,
    }


def write_compressed_dicom(path: Path, rgb: np.ndarray) -> Path:
    """A JPEG-baseline-compressed colour DICOM (encapsulated pixel data), written by SimpleITK."""
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(rgb, isVector=True))
    return path


def add_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 EXIF segment (big-endian TIFF, IFD0 with one Orientation entry) after SOI."""
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]

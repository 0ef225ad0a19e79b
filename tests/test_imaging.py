"""backend.imaging: every format round-trips, conversions follow the documented rules, bad files fail."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from backend.errors import InvalidImage, InvalidInput, NotFound
from backend.imaging import dicom as dicom_mod
from backend.imaging.io import (
    Geometry,
    decode_png_bytes,
    encode_png,
    read_image,
    read_image_bytes,
    read_mask,
    xy_to_rowcol,
)
from tests.support import imaging as samples

needs_pydicom = pytest.mark.skipif(
    importlib.util.find_spec("pydicom") is None, reason="pydicom (test-only dependency) writes the sample DICOMs"
)


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Route every temp file of the code under test into a folder the test can inspect."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(autouse=True)
def no_temp_file_left(private_tempdir: Path):  # type: ignore[no-untyped-def]
    yield
    assert list(private_tempdir.iterdir()) == []


def luma(rgb: np.ndarray) -> np.ndarray:
    return np.rint(rgb[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)


def only(path: Path, **kw: object) -> np.ndarray:
    frames = read_image(path, **kw)  # type: ignore[arg-type]
    assert len(frames) == 1
    assert frames[0].pixels.dtype == np.uint8 and frames[0].pixels.ndim == 2
    return frames[0].pixels


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp", ".nii", ".nii.gz", ".mha", ".mhd"])
def test_lossless_round_trip(tmp_path: Path, suffix: str) -> None:
    grey = samples.random_grey((37, 53))
    path = samples.write_sitk(tmp_path / f"img{suffix}", grey)
    frames = read_image(path)
    assert len(frames) == 1 and frames[0].frame_index == 0
    assert np.array_equal(frames[0].pixels, grey)
    formats = {
        ".png": "png",
        ".tif": "tiff",
        ".bmp": "bmp",
        ".nii": "nifti",
        ".nii.gz": "nifti",
        ".mha": "metaimage",
        ".mhd": "metaimage",
    }
    assert frames[0].source_format == formats[suffix]
    assert frames[0].metadata == {}


def test_jpeg_round_trip_is_close(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:64, 0:96]
    smooth = (xx * 2 + yy).astype(np.uint8)  # JPEG is lossy: use content it keeps well
    pixels = only(samples.write_sitk(tmp_path / "a.jpg", smooth))
    assert pixels.shape == smooth.shape
    assert np.abs(pixels.astype(int) - smooth).mean() < 2.0


def test_png_grey_is_not_given_spacing(tmp_path: Path) -> None:
    frame = read_image(samples.write_sitk(tmp_path / "a.png", samples.random_grey((4, 5))))[0]
    assert frame.geometry == Geometry(None, None, None)


@needs_pydicom
def test_dicom_single_frame(tmp_path: Path) -> None:
    grey = samples.random_grey((6, 9), seed=1)
    path = samples.write_dicom(tmp_path / "us.dcm", grey, extra={"PixelSpacing": [0.2, 0.3]})
    frame = read_image(path)[0]
    assert np.array_equal(frame.pixels, grey)
    assert frame.source_format == "dicom"
    assert frame.geometry.spacing == pytest.approx((0.2, 0.3))  # PixelSpacing is (row, col)
    assert frame.metadata["Modality"] == "US" and frame.metadata["PixelSpacing"] == "0.2\\0.3"


@needs_pydicom
def test_dicom_multiframe_cine_gives_one_image_per_frame(tmp_path: Path) -> None:
    cine = samples.random_grey((5, 6, 8), seed=2)
    path = samples.write_dicom(tmp_path / "cine.dcm", cine, frames=5)
    frames = read_image(path)
    assert [f.frame_index for f in frames] == [0, 1, 2, 3, 4]
    for k, frame in enumerate(frames):
        assert np.array_equal(frame.pixels, cine[k])
    assert frames[0].metadata["NumberOfFrames"] == "5" and frames[0].metadata["FrameTime"] == "33.3"


@needs_pydicom
def test_dicom_without_extension_or_with_uid_name_is_read(tmp_path: Path) -> None:
    grey = samples.random_grey((4, 4), seed=3)
    for name in ("IM_0001", "1.2.840.113619.2.55"):
        assert np.array_equal(only(samples.write_dicom(tmp_path / name, grey)), grey)


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("undefined_lengths", [False, True])
@needs_pydicom
def test_dicom_ultrasound_region_calibration(tmp_path: Path, implicit: bool, undefined_lengths: bool) -> None:
    grey = samples.random_grey((4, 6), seed=4)
    regions = [samples.us_region(0.01, 0.02), samples.us_region(0.5, 0.5, spatial_format=3)]  # 2D + doppler
    path = samples.write_dicom(
        tmp_path / "r.dcm", grey, implicit=implicit, regions=regions, undefined_lengths=undefined_lengths
    )
    assert (b"\xfe\xff\xdd\xe0" in path.read_bytes()) == undefined_lengths  # sequence delimiters
    frame = read_image(path)[0]
    assert np.array_equal(frame.pixels, grey)
    assert frame.geometry.spacing == pytest.approx((0.2, 0.1))  # delta Y, X in cm -> mm
    assert frame.metadata["PhysicalDeltaX"] == "0.01"


@needs_pydicom
def test_dicom_conflicting_regions_give_no_spacing(tmp_path: Path) -> None:
    regions = [samples.us_region(0.01, 0.02), samples.us_region(0.03, 0.02)]
    path = samples.write_dicom(tmp_path / "r.dcm", samples.random_grey((4, 6)), regions=regions)
    assert read_image(path)[0].geometry.spacing is None


def test_dicom_jpeg_compressed_colour(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:32, 0:48]
    rgb = np.stack([xx * 5, yy * 7, 255 - xx * 5], axis=-1).astype(np.uint8)
    pixels = only(samples.write_compressed_dicom(tmp_path / "jc.dcm", rgb))
    assert np.abs(pixels.astype(int) - luma(rgb)).mean() < 3.0


def test_nifti_2d_and_single_slice_volume_keep_spacing(tmp_path: Path) -> None:
    grey = samples.random_grey((8, 10), seed=5)
    flat = samples.write_sitk(tmp_path / "a.nii.gz", grey, spacing=(0.5, 0.25))
    slab = samples.write_sitk(tmp_path / "b.nii", grey[np.newaxis], spacing=(0.5, 0.25, 2.0))
    for path in (flat, slab):
        frame = read_image(path)[0]
        assert np.array_equal(frame.pixels, grey)
        assert frame.geometry.spacing == (0.25, 0.5)  # SimpleITK (x, y) -> (row, col)
        assert frame.geometry.direction is not None


def test_volume_slices_become_frames_with_their_origin(tmp_path: Path) -> None:
    volume = samples.random_grey((3, 8, 10), seed=6)
    for suffix in (".nii.gz", ".mha", ".tif"):
        path = samples.write_sitk(tmp_path / f"v{suffix}", volume, spacing=(1.0, 1.0, 2.5))
        frames = read_image(path)
        assert len(frames) == 3
        for k, frame in enumerate(frames):
            assert np.array_equal(frame.pixels, volume[k])
        if suffix != ".tif":
            assert frames[2].geometry.origin is not None and frames[2].geometry.origin[2] == pytest.approx(5.0)


def test_xy_to_rowcol_is_its_own_inverse() -> None:
    assert xy_to_rowcol((0.5, 0.25)) == (0.25, 0.5)
    assert xy_to_rowcol(xy_to_rowcol((1.0, 2.0))) == (1.0, 2.0)


# -- colour and intensity ----------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 4])
def test_colour_png_becomes_bt601_luma(tmp_path: Path, channels: int) -> None:
    rgb = samples.random_grey((9, 11, channels), seed=7)
    pixels = only(samples.write_sitk(tmp_path / "c.png", rgb, vector=True))
    assert np.array_equal(pixels, luma(rgb))


@needs_pydicom
def test_dicom_rgb_and_ybr_become_luma(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    rgb = samples.random_grey((4, 6, 3), seed=8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    assert np.array_equal(only(samples.write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")), luma(rgb))
    from_ybr = only(samples.write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))
    assert np.abs(from_ybr.astype(int) - luma(rgb)).max() <= 1  # 8-bit YBR round trip loses ~1 level


@needs_pydicom
def test_dicom_monochrome1_is_shown_bright_high(tmp_path: Path) -> None:
    grey = samples.random_grey((4, 6), seed=9)
    assert np.array_equal(only(samples.write_dicom(tmp_path / "m1.dcm", grey, photometric="MONOCHROME1")), 255 - grey)


def test_16bit_png_is_min_max_rescaled(tmp_path: Path) -> None:
    values = np.array([[1000, 1100, 1200], [1300, 1400, 2020]], dtype=np.uint16)
    pixels = only(samples.write_sitk(tmp_path / "w.png", values))
    expected = np.rint((values - 1000.0) * 255.0 / 1020.0).astype(np.uint8)
    assert np.array_equal(pixels, expected)
    assert pixels.min() == 0 and pixels.max() == 255


def test_cine_is_rescaled_with_one_range_for_all_frames(tmp_path: Path) -> None:
    volume = np.stack([np.full((4, 4), 100, np.uint16), np.full((4, 4), 300, np.uint16)])
    frames = read_image(samples.write_sitk(tmp_path / "v.mha", volume))
    assert frames[0].pixels.max() == 0 and frames[1].pixels.min() == 255


def test_float_with_nan_and_constant_images(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, np.nan], [1.0, 0.25, 0.75]], dtype=np.float32)
    pixels = only(samples.write_sitk(tmp_path / "f.nii", values))
    assert pixels.tolist() == [[0, 128, 0], [255, 64, 191]]
    assert only(samples.write_sitk(tmp_path / "k.nii", np.full((3, 3), 7.5, np.float32))).max() == 0


@needs_pydicom
def test_16bit_dicom_uses_its_window(tmp_path: Path) -> None:
    stored = np.array([[0, 1000, 1500], [2000, 2500, 4000]], dtype=np.uint16)
    path = samples.write_dicom(
        tmp_path / "w.dcm",
        stored,
        extra={"WindowCenter": 1000, "WindowWidth": 1001, "RescaleSlope": 1, "RescaleIntercept": -1000},
    )
    values = stored.astype(np.float64) - 1000  # modality values after the rescale
    expected = np.clip(np.rint(((values - 999.5) / 1000.0 + 0.5) * 255), 0, 255).astype(np.uint8)
    pixels = only(path)
    assert np.array_equal(pixels, expected)
    assert pixels.tolist() == [[0, 0, 0], [128, 255, 255]]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    image_module = pytest.importorskip("PIL.Image")
    image_ops = pytest.importorskip("PIL.ImageOps")
    yy, xx = np.mgrid[0:48, 0:80]
    grey = ((xx // 16) * 40 + (yy // 16) * 10).astype(np.uint8)  # blocky, so JPEG keeps it
    plain = samples.write_sitk(tmp_path / "p.jpg", grey).read_bytes()
    path = tmp_path / "o.jpg"
    path.write_bytes(samples.add_exif_orientation(plain, orientation))
    with image_module.open(path) as im:
        upright = np.asarray(image_ops.exif_transpose(im).convert("L"))
    pixels = only(path)
    assert pixels.shape == upright.shape
    assert np.abs(pixels.astype(int) - upright).max() <= 2


# -- de-identification -----------------------------------------------------------------------------


@needs_pydicom
def test_dicom_identifying_tags_never_come_back(tmp_path: Path) -> None:
    path = samples.write_dicom(
        tmp_path / "phi.dcm", samples.random_grey((4, 6)), frames=None, regions=[samples.us_region(0.01, 0.01)]
    )
    frames = read_image(path) + read_image_bytes(path.read_bytes(), "phi.dcm")
    text = repr(frames) + repr([f.metadata for f in frames])
    for value in samples.IDENTIFYING.values():
        assert value not in text
        assert value.split("^")[0] not in text
    assert "1.2.826" not in text and "1.2.840.10008" not in text  # no UIDs either
    assert set(frames[0].metadata) <= set(dicom_mod.KEPT_DICOM_TAGS.values())
    assert {"Modality", "Manufacturer", "ManufacturerModelName", "Rows", "Columns"} <= set(frames[0].metadata)


def test_kept_metadata_filters_by_allow_list() -> None:
    tags = {"0010|0010": "DOE^JANE", "0008|0060": "US ", "0008|0080": "Hospital", "0029|1010": "private"}
    assert dicom_mod.kept_metadata(tags) == {"Modality": "US"}


# -- masks ---------------------------------------------------------------------------------------


def test_palette_png_mask_gives_palette_indices(tmp_path: Path) -> None:
    indices = np.random.default_rng(10).integers(0, 4, (16, 12), dtype=np.uint8)
    path = tmp_path / "m.png"
    path.write_bytes(samples.palette_png(indices, [(0, 0, 0), (128, 0, 0), (0, 128, 0), (9, 9, 9)]))
    assert np.array_equal(read_mask(path), indices)
    assert np.array_equal(decode_png_bytes(path.read_bytes()), indices)


def test_palette_with_a_duplicated_used_colour_is_ambiguous(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    path.write_bytes(samples.palette_png(np.array([[0, 1, 2]], np.uint8), [(0, 0, 0), (5, 5, 5), (5, 5, 5)]))
    with pytest.raises(InvalidImage, match="ambiguous"):
        read_mask(path)


@pytest.mark.skipif(not (samples.REAL_DATA / "masks" / "0000.png").exists(), reason="usgra-seg not present")
def test_real_usgra_seg_palette_mask() -> None:
    mask = read_mask(samples.REAL_DATA / "masks" / "0000.png")
    assert mask.shape == (512, 512) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1, 2}
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(samples.REAL_DATA / "masks" / "0000.png") as im:
        assert np.array_equal(mask, np.asarray(im))  # Pillow keeps palette indices: independent oracle


@pytest.mark.skipif(not (samples.REAL_DATA / "images" / "0000.png").exists(), reason="usgra-seg not present")
def test_real_usgra_seg_image() -> None:
    path = samples.REAL_DATA / "images" / "0000.png"
    frame = read_image(path)[0]
    assert frame.pixels.shape == (512, 512)
    assert np.array_equal(frame.pixels, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_mha_and_nifti_segmentations_keep_labels(tmp_path: Path, dtype: type) -> None:
    labels = np.random.default_rng(11).integers(0, 6, (10, 12)).astype(dtype)
    for suffix in (".mha", ".nii.gz"):
        mask = read_mask(samples.write_sitk(tmp_path / f"seg{suffix}", labels))
        assert mask.dtype == np.uint8 and np.array_equal(mask, labels.astype(np.uint8))


def test_multislice_segmentation_needs_a_frame(tmp_path: Path) -> None:
    labels = np.random.default_rng(12).integers(0, 3, (3, 5, 7), dtype=np.uint8)
    path = samples.write_sitk(tmp_path / "seg.mha", labels)
    with pytest.raises(InvalidImage, match="frame_index"):
        read_mask(path)
    assert np.array_equal(read_mask(path, frame_index=2), labels[2])
    with pytest.raises(InvalidImage, match="frame 3"):
        read_mask(path, frame_index=3)


def test_binary_0_255_mask_becomes_class_1(tmp_path: Path) -> None:
    binary = np.zeros((6, 6), np.uint8)
    binary[2:4, 1:5] = 255
    assert np.array_equal(read_mask(samples.write_sitk(tmp_path / "b.png", binary)), binary // 255)
    grey_classes = np.array([[0, 1, 2, 255]], np.uint8)  # not binary: left alone
    assert np.array_equal(read_mask(samples.write_sitk(tmp_path / "g.png", grey_classes)), grey_classes)


def test_mask_rejections(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage, match="JPEG"):
        read_mask(samples.write_sitk(tmp_path / "m.jpg", samples.random_grey((8, 8))))
    with pytest.raises(InvalidImage, match="palette"):
        read_mask(samples.write_sitk(tmp_path / "c.png", samples.random_grey((4, 4, 3)), vector=True))
    with pytest.raises(InvalidImage, match="whole numbers"):
        read_mask(samples.write_sitk(tmp_path / "f.mha", np.array([[0.0, 1.5]], np.float32)))
    with pytest.raises(InvalidImage, match="0..255"):
        read_mask(samples.write_sitk(tmp_path / "n.mha", np.array([[0, -1]], np.int16)))


# -- PNG codec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 9), (7, 9, 3), (7, 9, 4)])
def test_encode_png_round_trips_through_simpleitk(tmp_path: Path, shape: tuple[int, ...]) -> None:
    array = samples.random_grey(shape, seed=13)
    data = encode_png(array)
    assert np.array_equal(decode_png_bytes(data), array)
    path = tmp_path / "e.png"
    path.write_bytes(data)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), array)  # an independent decoder path


def test_encode_png_rejects_what_it_cannot_store() -> None:
    for bad in (np.zeros((3, 3), np.float32), np.zeros((3, 3, 2), np.uint8), np.zeros((0, 3), np.uint8)):
        with pytest.raises(InvalidInput):
            encode_png(bad)


def test_decode_png_bytes_refuses_other_formats() -> None:
    with pytest.raises(InvalidImage, match="expected PNG"):
        decode_png_bytes(b"BM" + bytes(60))


# -- bytes from HTTP -----------------------------------------------------------------------------


def test_read_image_bytes_sniffs_content_not_name(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:16, 0:16]
    grey = (xx * 8 + yy * 4).astype(np.uint8)
    jpeg = samples.write_sitk(tmp_path / "a.jpg", grey).read_bytes()
    assert read_image_bytes(jpeg, "looks-like.png")[0].source_format == "jpeg"
    nifti = samples.write_sitk(tmp_path / "a.nii.gz", grey).read_bytes()
    frame = read_image_bytes(nifti, "/data/upload/3/blob")[0]
    assert frame.source_format == "nifti" and np.array_equal(frame.pixels, grey)


def test_nifti_under_a_wrong_name_is_read(tmp_path: Path) -> None:
    grey = samples.random_grey((5, 7), seed=14)
    data = samples.write_sitk(tmp_path / "a.nii.gz", grey).read_bytes()
    renamed = tmp_path / "exported.png"
    renamed.write_bytes(data)
    assert np.array_equal(only(renamed), grey)


def test_read_image_bytes_refuses_detached_metaimage(tmp_path: Path) -> None:
    header = samples.write_sitk(tmp_path / "v.mhd", samples.random_grey((4, 4))).read_bytes()
    with pytest.raises(InvalidImage, match="single .mha"):
        read_image_bytes(header, "v.mhd")


# -- bad inputs ------------------------------------------------------------------------------------


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(InvalidImage, match=r"notes\.png: not an image"):
        read_image(path)
    with pytest.raises(InvalidImage, match="photo.png: not an image"):
        read_image_bytes(path.read_bytes(), "photo.png")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif", ".nii", ".nii.gz", ".mha"])
def test_file_cut_in_half_is_rejected(tmp_path: Path, suffix: str) -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    grey = ((xx * 3 + yy * 5) % 256).astype(np.uint8)
    full = samples.write_sitk(tmp_path / f"full{suffix}", grey).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(InvalidImage, match=rf"cut{suffix.replace('.', '[.]')}: .*"):
        read_image(cut)


def test_tiff_with_its_pixels_cut_short_is_rejected(tmp_path: Path) -> None:
    grey = samples.random_grey((64, 64), seed=16)
    full, cut = tmp_path / "full.tif", tmp_path / "cut.tif"
    full.write_bytes(samples.tiff_ifd_first(grey))
    cut.write_bytes(full.read_bytes()[:3000])  # header and IFD intact, strip data short
    assert np.array_equal(only(full), grey)
    with pytest.raises(InvalidImage, match="cut.tif: cannot decode pixels"):
        read_image(cut)


def test_png_truncated_just_before_iend_is_rejected(tmp_path: Path) -> None:
    full = samples.write_sitk(tmp_path / "a.png", samples.random_grey((64, 64))).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(full[:-12])  # every pixel present, only the IEND chunk missing
    with pytest.raises(InvalidImage, match="truncated"):
        read_image(cut)


@pytest.mark.parametrize("compressed", [False, True])
@needs_pydicom
def test_truncated_dicom_is_rejected(tmp_path: Path, compressed: bool) -> None:
    rgb = samples.random_grey((32, 32, 3), seed=15)
    full = (
        samples.write_compressed_dicom(tmp_path / "a.dcm", rgb)
        if compressed
        else samples.write_dicom(tmp_path / "a.dcm", rgb, photometric="RGB")
    ).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full[: len(full) - 200])
    with pytest.raises(InvalidImage, match="cut.dcm: invalid DICOM: the file is truncated"):
        read_image(cut)


@needs_pydicom
def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = samples.write_dicom(tmp_path / "sr.dcm", samples.random_grey((4, 4)), pixel_data=False)
    with pytest.raises(InvalidImage, match="sr.dcm: invalid DICOM: it has no pixel data"):
        read_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    original = sitk.ImageFileReader.Execute

    def spy(self: sitk.ImageFileReader) -> sitk.Image:
        decoded.append(self.GetFileName())
        return original(self)

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", spy)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(samples.bomb_png(30000))
    assert bomb.stat().st_size < 10_000
    with pytest.raises(InvalidImage, match="bomb.png: 30000x30000 pixels exceeds the 8192-pixel side limit"):
        read_image(bomb)
    with pytest.raises(InvalidImage, match="side limit"):
        read_image_bytes(bomb.read_bytes(), "bomb.png")
    real = samples.write_sitk(tmp_path / "zeros.png", np.zeros((600, 600), np.uint8))  # complete and valid
    with pytest.raises(InvalidImage, match="side limit"):
        read_image(real, max_side=512)
    with pytest.raises(InvalidImage, match="decoded bytes"):
        read_image(real, max_decoded_bytes=600 * 600 - 1)
    assert decoded == []
    read_image(real)
    assert len(decoded) == 1  # the spy does see real decodes


def test_size_limits_empty_missing_and_extensions(tmp_path: Path) -> None:
    png = samples.write_sitk(tmp_path / "a.png", samples.random_grey((8, 8)))
    with pytest.raises(InvalidImage, match=r"a\.png: \d+ bytes is over the 100-byte limit"):
        read_image(png, max_bytes=100)
    with pytest.raises(InvalidImage, match="over the 100-byte limit"):
        read_image_bytes(png.read_bytes(), "a.png", max_bytes=100)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InvalidImage, match="empty.png: the file is empty"):
        read_image(empty)
    with pytest.raises(InvalidImage, match="empty"):
        read_image_bytes(b"", "x.png")
    with pytest.raises(NotFound):
        read_image(tmp_path / "missing.png")
    for name in ("a.gif", "a.webp", "a.txt"):
        renamed = tmp_path / name
        renamed.write_bytes(png.read_bytes())
        with pytest.raises(InvalidImage, match="unsupported extension"):
            read_image(renamed)


def test_grey_alpha_png_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    path.write_bytes(samples.grey_alpha_png())
    with pytest.raises(InvalidImage, match="grey\\+alpha"):
        read_image(path)


def test_metaimage_data_file_must_sit_beside_its_header(tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    samples.write_sitk(tmp_path / "secret.mhd", samples.random_grey((4, 4)))
    header = (tmp_path / "secret.mhd").read_text()
    for target in (str(tmp_path / "secret.raw"), "../secret.raw"):
        evil = inside / "evil.mhd"
        evil.write_text(header.replace("ElementDataFile = secret.raw", f"ElementDataFile = {target}"))
        with pytest.raises(InvalidImage, match="beside the header"):
            read_image(evil)
    (tmp_path / "secret.raw").write_bytes(b"\x00" * 5)
    with pytest.raises(InvalidImage, match="truncated"):
        read_image(tmp_path / "secret.mhd")

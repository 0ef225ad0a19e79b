"""Curators' import/export through the real store and database (SQLite and PostgreSQL).

Same image twice -> one row; a second mask -> a second version with the first still readable;
bad files rejected with a clear message and nothing half-written left behind.
"""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from backend.db.models import Image, ImageSource, MaskVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidInput, UnknownLabel
from backend.imaging.io import encode_png
from backend.services.images import load_pixels
from backend.services.masks import add_mask_version, current_mask_version, deactivate_annotation, read_mask
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from cli.main import cli
from tests.support.datasets import Importer, write_png
from tests.support.frames import synthetic_frame


@pytest.fixture
def importer(factory: SessionFactory, store: LocalBlobStore, settings: Settings) -> Importer:
    """``import_files`` into this test's database and store (project ``p``, Nerve and Vessel)."""
    return Importer(factory, store, settings)


def _counts(factory: SessionFactory) -> tuple[int, int, int]:
    with factory() as s:
        return (
            s.scalar(select(func.count(Image.id))) or 0,
            s.scalar(select(func.count(MaskVersion.id))) or 0,
            s.scalar(select(func.count(ImageSource.id))) or 0,
        )


def _files_in(store: LocalBlobStore) -> list[Path]:
    return sorted(p for p in store.root.rglob("*") if p.is_file()) if store.root.exists() else []


def test_same_image_twice_is_one_row(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, importer: Importer
) -> None:
    img, _ = synthetic_frame(1)
    a = write_png(tmp_path / "in" / "a.png", img)
    b = write_png(tmp_path / "in" / "copy-of-a.png", img)
    r1 = importer([a])
    r2 = importer([a, b])
    assert (r1.images_added, r2.images_added, r2.images_existing) == (1, 0, 2)
    images, masks, sources = _counts(factory)
    assert images == 1 and masks == 0 and sources == 2  # two provenance records, one image
    with factory() as s:
        image = s.scalars(select(Image)).one()
        assert np.array_equal(load_pixels(store, image), img)
        assert image.subject.startswith("subj-") and str(tmp_path) not in image.subject


def test_second_mask_is_a_second_version(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, importer: Importer
) -> None:
    img, mask = synthetic_frame(2)
    write_png(tmp_path / "images" / "f.png", img)
    write_png(tmp_path / "masks" / "f.png", mask)
    importer([tmp_path / "images"], mask_dir=tmp_path / "masks")
    corrected = mask.copy()
    corrected[:10] = 1
    with unit_of_work(factory) as s:
        project = s.scalars(select(Project)).one()
        image = s.scalars(select(Image)).one()
        written = add_mask_version(
            s, store, project, image, corrected, source="annotation", author="sono", ls_annotation_id=7
        )
        assert written.mask_version.version == 2 and written.created and written.current
    with factory() as s:
        image = s.scalars(select(Image)).one()
        v1, v2 = s.scalars(select(MaskVersion).order_by(MaskVersion.version)).all()
        assert (v1.is_current, v2.is_current) == (False, True)
        assert np.array_equal(read_mask(store, v1), mask)  # the first version is still readable
        assert np.array_equal(read_mask(store, v2), corrected)
    with unit_of_work(factory) as s:  # deleting the annotation falls back to the import
        deactivate_annotation(s, 7)
    with factory() as s:
        image = s.scalars(select(Image)).one()
        current = current_mask_version(s, image)
        assert current is not None and current.version == 1


def test_mask_must_match_image_and_classes(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, importer: Importer
) -> None:
    img, mask = synthetic_frame(3)
    importer([write_png(tmp_path / "x.png", img)])
    before = _files_in(store)
    with pytest.raises(UnknownLabel):
        with unit_of_work(factory) as s:
            add_mask_version(
                s,
                store,
                s.scalars(select(Project)).one(),
                s.scalars(select(Image)).one(),
                np.full_like(mask, 5),
                source="annotation",
            )
    with pytest.raises(InvalidInput, match="mask is"):
        with unit_of_work(factory) as s:
            add_mask_version(
                s,
                store,
                s.scalars(select(Project)).one(),
                s.scalars(select(Image)).one(),
                mask[:10],
                source="annotation",
            )
    assert _counts(factory)[1] == 0 and _files_in(store) == before


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    img, _ = synthetic_frame(4)
    good = encode_png(img)
    bad = tmp_path / "bad"
    bad.mkdir()
    files = {
        "truncated": bad / "truncated.png",
        "text": bad / "notes.png",
        "huge": bad / "huge.png",
        "empty": bad / "empty.png",
    }
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["text"].write_text("this is not an image\n" * 20)
    # A real, tiny PNG that claims 30000 x 30000 pixels (a decompression bomb).
    raw = zlib.compress(b"\x00" * (30000 + 1) * 16)
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    files["huge"].write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    files["empty"].write_bytes(b"")
    return files


def test_bad_files_are_rejected_and_leave_nothing(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, importer: Importer
) -> None:
    img, _ = synthetic_frame(5)
    good = write_png(tmp_path / "good.png", img)
    importer([good])
    before_counts, before_files = _counts(factory), _files_in(store)
    files = _bad_files(tmp_path)
    report = importer(list(files.values()))
    assert report.images_added == 0 and len(report.errors) == len(files)
    messages = dict(report.errors)
    for path in files.values():
        assert path.name in messages[str(path)]  # every message names the file
    assert "30000" in messages[str(files["huge"])]
    assert _counts(factory) == before_counts and _files_in(store) == before_files
    assert store.leftover_temp_files() == []


def test_dicom_without_pixel_data_is_rejected(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, importer: Importer
) -> None:
    pytest.importorskip("pydicom")
    from tests.support.imaging import write_dicom

    path = write_dicom(tmp_path / "nopix.dcm", np.zeros((8, 8), np.uint8), pixel_data=False)
    report = importer([path])
    assert report.images_added == 0 and len(report.errors) == 1
    assert "pixel" in report.errors[0][1].lower()
    assert _counts(factory) == (0, 0, 0) and _files_in(store) == []


def test_cli_import_export_round_trip(tmp_path: Path, db_url: str) -> None:
    env = {"SONOSEG_DATA_DIR": str(tmp_path / "data"), "SONOSEG_DATABASE_URL": db_url}
    for i in range(6):
        img, mask = synthetic_frame(10 + i)
        write_png(tmp_path / "images" / f"{i:02d}.png", img)
        write_png(tmp_path / "masks" / f"{i:02d}.png", mask)
    runner = CliRunner()
    out = runner.invoke(
        cli, ["import", "--project", "demo", "--masks", str(tmp_path / "masks"), str(tmp_path / "images")], env=env
    )
    assert out.exit_code == 0, out.output
    assert "6 new image(s)" in out.output and "6 mask(s)" in out.output
    out = runner.invoke(cli, ["export", "--project", "demo", "--out", str(tmp_path / "export")], env=env)
    assert out.exit_code == 0, out.output
    with open(tmp_path / "export" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["split"] for r in rows} <= {"train", "val", "test"}
    from backend.imaging.io import read_image, read_mask

    for row in rows:
        assert read_image(tmp_path / "export" / "images" / row["file"])[0].pixels.shape == (96, 128)
        assert set(np.unique(read_mask(tmp_path / "export" / "masks" / row["file"]))) <= {0, 1, 2}
    bad = runner.invoke(cli, ["import", "--project", "demo", str(_bad_files(tmp_path)["text"])], env=env)
    assert bad.exit_code == 1 and "notes.png" in bad.output


def test_shared_dataset_imports_with_palette_masks(
    factory: SessionFactory, store: LocalBlobStore, importer: Importer, shared_data: Path | None
) -> None:
    if shared_data is None:
        pytest.skip("../shared/data/usgra-seg is absent (generated data covers the other tests)")
    paths = sorted((shared_data / "images").glob("*.png"))[:3]
    report = importer(paths, project="usgra", mask_dir=shared_data / "masks")
    assert (report.images_added, report.masks_added, report.errors) == (3, 3, [])
    with factory() as s:
        for mv in s.scalars(select(MaskVersion)):
            assert set(np.unique(read_mask(store, mv))) <= {0, 1, 2} and mv.foreground_pixels > 0

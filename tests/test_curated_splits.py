"""Splits the curator controls: ``--split``, a splits CSV, subjects from DICOM PatientID or folders,
the frozen test split, ``sonoseg split move/log/freeze``; multi-frame masks; the mask folder
indexed once per import; nnU-Net datasets.

Real databases (SQLite, and PostgreSQL when configured), real files generated at test time.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select, text

from backend.db.base import Base
from backend.db.models import Image, MaskVersion, Project, SplitChange
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import Conflict, InvalidInput
from backend.imaging.io import encode_png
from backend.services.dataset import ImportProgress, SubjectRule, match_splits_csv, parse_splits_csv
from backend.services.masks import read_mask
from backend.services.splits import SplitFractions, assign_split, freeze_test, move_subject, split_log
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from cli.main import cli
from tests.support.datasets import Importer, write_png
from tests.support.frames import synthetic_frame


@pytest.fixture
def importer(factory: SessionFactory, store: LocalBlobStore, settings: Settings) -> Importer:
    """``import_files`` into this test's database and store (project ``p``, Nerve and Vessel)."""
    return Importer(factory, store, settings)


def _frames(tmp_path: Path, folder: str, n: int, seed: int, *, masks: bool = False) -> Path:
    for i in range(n):
        img, mask = synthetic_frame(seed + i, size=(32, 40))
        write_png(tmp_path / folder / "images" / f"{i:03d}.png", img)
        if masks:
            write_png(tmp_path / folder / "masks" / f"{i:03d}.png", mask)
    return tmp_path / folder


def _splits(factory: SessionFactory) -> dict[str, int]:
    with factory() as s:
        return {split: n for split, n in s.execute(select(Image.split, func.count(Image.id)).group_by(Image.split))}


# -- pure assignment -------------------------------------------------------------------------------


@hsettings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40), st.text(max_size=8))
def test_frozen_assignment_never_gives_test_and_keeps_train(subject: str, salt: str) -> None:
    frozen = assign_split(subject, salt, test_frozen=True)
    assert frozen in ("train", "val")
    if assign_split(subject, salt) == "train":  # re-normalising only widens train
        assert frozen == "train"


def test_frozen_assignment_renormalises_fractions() -> None:
    splits = [assign_split(f"subj-{i:05d}", "7", test_frozen=True) for i in range(4000)]
    assert abs(splits.count("train") / len(splits) - 0.70 / 0.85) < 0.03
    frozen = SplitFractions().without_test()
    assert (frozen.train, frozen.val, frozen.test) == pytest.approx((0.70 / 0.85, 0.15 / 0.85, 0.0))


# -- --split and the frozen test split ---------------------------------------------------------------


def test_split_test_freezes_and_automatic_assignment_never_adds_to_test(
    tmp_path: Path, factory: SessionFactory, importer: Importer
) -> None:
    held_out = _frames(tmp_path, "test", 5, seed=100, masks=True)
    report = importer([held_out / "images"], mask_dir=held_out / "masks", split="test", author="curator-a")
    assert (report.images_added, report.masks_added, report.errors) == (5, 5, [])
    assert report.added_by_split == {"test": 5} and report.froze_test
    with factory() as s:
        project = s.scalars(select(Project)).one()
        assert project.test_frozen
        freeze = s.scalars(select(SplitChange)).one()
        assert (freeze.kind, freeze.author) == ("freeze", "curator-a")
    # 60 new subjects: unfrozen, about 9 would hash to test; frozen, none may
    auto = _frames(tmp_path, "auto", 60, seed=200)
    report = importer([auto / "images"])
    assert report.images_added == 60 and not report.froze_test
    assert _splits(factory)["test"] == 5
    assert set(_splits(factory)) == {"train", "val", "test"}
    # re-importing the held-out files is idempotent and keeps them in test
    again = importer([held_out / "images"], split="test")
    assert (again.images_existing, again.errors) == (5, [])
    assert _splits(factory)["test"] == 5


def test_split_freeze_stops_test_assignment(tmp_path: Path, factory: SessionFactory, importer: Importer) -> None:
    first = _frames(tmp_path, "a", 40, seed=300)
    importer([first])
    before = _splits(factory).get("test", 0)
    assert before > 0  # the hash put some subjects in test
    with unit_of_work(factory) as s:
        assert freeze_test(s, s.scalars(select(Project)).one(), author="me", reason="benchmark fixed")
    with unit_of_work(factory) as s:
        assert not freeze_test(s, s.scalars(select(Project)).one(), author="me")  # already frozen: no record
    more = _frames(tmp_path, "b", 40, seed=400)
    importer([more])
    assert _splits(factory)["test"] == before  # nothing moved out, nothing new in
    with factory() as s:
        assert s.scalar(select(func.count(SplitChange.id))) == 1


def test_explicit_split_never_splits_a_subject(tmp_path: Path, factory: SessionFactory, importer: Importer) -> None:
    a = write_png(tmp_path / "p1" / "a.png", synthetic_frame(1, (24, 24))[0])
    b = write_png(tmp_path / "p1" / "b.png", synthetic_frame(2, (24, 24))[0])
    importer([a], subject="P1", split="val")
    report = importer([b], subject="P1", split="train")
    assert report.images_added == 0 and len(report.errors) == 1
    assert "already in val" in report.errors[0][1] and "split move" in report.errors[0][1]
    auto = importer([b], subject="P1")
    assert auto.added_by_split == {"val": 1}  # automatic: the subject's split, whatever the hash says
    # the same pixels already in val cannot be imported into test either
    same = importer([a], split="test")
    assert len(same.errors) == 1 and "already image" in same.errors[0][1]
    with factory() as s:
        assert not s.scalars(select(Project)).one().test_frozen  # the refused file froze nothing


def test_split_move_refuses_frozen_test_without_force_and_logs(tmp_path: Path, db_url: str) -> None:
    env = {"SONOSEG_DATA_DIR": str(tmp_path / "data"), "SONOSEG_DATABASE_URL": db_url}
    held_out = _frames(tmp_path, "t", 2, seed=500)
    train = _frames(tmp_path, "tr", 3, seed=600)
    runner = CliRunner()
    out = runner.invoke(cli, ["import", "--project", "demo", "--split", "test", "--by", "ann", str(held_out)], env=env)
    assert out.exit_code == 0, out.output
    assert "(2 test)" in out.output and "now frozen" in out.output
    out = runner.invoke(cli, ["import", "--project", "demo", "--split", "train", str(train)], env=env)
    assert out.exit_code == 0, out.output
    from backend.db.session import make_engine, make_session_factory

    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as s:
        test_image = s.scalars(select(Image).where(Image.split == "test").order_by(Image.id)).first()
        train_image = s.scalars(select(Image).where(Image.split == "train").order_by(Image.id)).first()
        assert test_image is not None and train_image is not None
        test_subject, test_id, train_subject = test_image.subject, test_image.id, train_image.subject

    out = runner.invoke(
        cli, ["split", "move", "--project", "demo", "--subject", test_subject, "--to", "train"], env=env
    )
    assert out.exit_code != 0 and "frozen" in out.output and "--force" in out.output
    out = runner.invoke(
        cli, ["split", "move", "--project", "demo", "--subject", train_subject, "--to", "test"], env=env
    )
    assert out.exit_code != 0 and "into test" in out.output
    out = runner.invoke(cli, ["split", "move", "--project", "demo", "--subject", train_subject, "--to", "val"], env=env)
    assert out.exit_code == 0 and "1 image(s) moved to val (1 from train)" in out.output
    out = runner.invoke(
        cli,
        [
            *("split", "move", "--project", "demo", "--image", str(test_id), "--to", "val", "--force"),
            *("--reason", "duplicate of a training patient", "--by", "bob"),
        ],
        env=env,
    )
    assert out.exit_code == 0, out.output
    assert "forced" in out.output
    out = runner.invoke(cli, ["split", "move", "--project", "demo", "--subject", "subj-nope", "--to", "val"], env=env)
    assert out.exit_code != 0 and "no subject" in out.output
    out = runner.invoke(cli, ["split", "log", "--project", "demo", "--json"], env=env)
    assert out.exit_code == 0, out.output
    records = [json.loads(line) for line in out.output.splitlines()]
    assert [r["kind"] for r in records] == ["freeze", "move", "move"]
    assert records[0]["author"] == "ann"
    assert (records[1]["subject"], records[1]["from_split"], records[1]["to_split"]) == (train_subject, "train", "val")
    assert records[1]["author"]  # the OS user when --by is absent
    forced = records[2]
    assert (forced["subject"], forced["image_id"], forced["from_split"], forced["to_split"]) == (
        test_subject,
        test_id,
        "test",
        "val",
    )
    assert forced["forced"] and forced["author"] == "bob" and forced["reason"] == "duplicate of a training patient"
    out = runner.invoke(cli, ["split", "log", "--project", "demo"], env=env)
    assert "FORCED, by bob" in out.output and "freeze test split, by ann" in out.output
    out = runner.invoke(cli, ["split", "show", "--project", "demo", "--json"], env=env)
    shown = json.loads(out.output)
    assert shown["test_frozen"] and shown["images"] == {"train": 2, "val": 2, "test": 1}
    # a subject named by the raw identifier the import was given (pseudonymised, never stored)
    extra = _frames(tmp_path, "x", 1, seed=650)
    args = ["import", "--project", "demo", "--subject", "HOSP-0042", "--split", "train", str(extra)]
    assert runner.invoke(cli, args, env=env).exit_code == 0
    out = runner.invoke(cli, ["split", "move", "--project", "demo", "--subject", "HOSP-0042", "--to", "val"], env=env)
    assert out.exit_code == 0 and "1 image(s) moved to val" in out.output and "HOSP-0042" not in out.output
    assert "HOSP-0042" not in _all_rows_text(factory)
    engine.dispose()


def test_move_subject_service_rules(tmp_path: Path, factory: SessionFactory, importer: Importer) -> None:
    cine = [write_png(tmp_path / "s" / f"{i}.png", synthetic_frame(40 + i, (24, 24))[0]) for i in range(3)]
    importer(cine, subject="S", split="train")
    with unit_of_work(factory) as s:
        project = s.scalars(select(Project)).one()
        subject = s.scalars(select(Image.subject)).first()
        assert subject is not None
        with pytest.raises(InvalidInput):
            move_subject(s, project, to="val", author="x")
        with pytest.raises(InvalidInput, match="unknown split"):
            move_subject(s, project, to="holdout", author="x", subject=subject)
        moved = move_subject(s, project, to="test", author="x", subject=subject)  # not frozen yet: allowed
        assert moved.images == 3 and moved.froze_test and project.test_frozen
        with pytest.raises(Conflict):
            move_subject(s, project, to="train", author="x", subject=subject)
        again = move_subject(s, project, to="test", author="x", subject=subject)
        assert again.moved == () and not again.forced
        assert [r.kind for r in split_log(s, project)] == ["move", "freeze"]


# -- subjects: DICOM PatientID, folder levels -------------------------------------------------------


def _all_rows_text(factory: SessionFactory) -> str:
    parts: list[str] = []
    with factory() as s:
        for table in Base.metadata.sorted_tables:
            parts.extend(repr(tuple(row)) for row in s.execute(select(table)))
        if s.get_bind().dialect.name == "postgresql":  # also the raw JSON / text as PostgreSQL stores it
            for table in Base.metadata.sorted_tables:
                parts.extend(str(r) for r in s.execute(text(f'SELECT t::text FROM "{table.name}" t')))
    return "\n".join(parts)


def test_patient_id_keeps_a_patients_files_together_and_is_never_stored(
    tmp_path: Path, factory: SessionFactory, importer: Importer, settings: Settings, db_url: str
) -> None:
    pytest.importorskip("pydicom")
    from tests.support.imaging import IDENTIFYING, write_dicom

    patient = IDENTIFYING["PatientID"]
    files = []
    for i, pid in enumerate([patient, patient, "OTHER-77", "OTHER-78", "OTHER-79"]):
        pixels = synthetic_frame(700 + i, (24, 32))[0]
        (tmp_path / f"dir{i}").mkdir()
        files.append(write_dicom(tmp_path / f"dir{i}" / f"scan{i}.dcm", pixels, extra={"PatientID": pid}))
    report = importer(files)
    assert (report.images_added, report.errors) == (5, [])
    with factory() as s:
        rows = s.execute(select(Image.subject, Image.split).order_by(Image.id)).all()
    assert rows[0] == rows[1] and len({r.subject for r in rows}) == 4  # one patient, one subject, one split
    dumped = _all_rows_text(factory)
    for value in (patient, "OTHER-77", IDENTIFYING["PatientName"].split("^")[0], "scan0", str(tmp_path)):
        assert value not in dumped
    if db_url.startswith("sqlite"):
        raw = b"".join(p.read_bytes() for p in settings.data_dir.glob("sonoseg.db*"))
        raw += b"".join(p.read_bytes() for p in tmp_path.glob("sonoseg.db*"))
        assert patient.encode() not in raw and b"OTHER-77" not in raw
    # a CSV subject or --subject overrides the PatientID; --no-patient-id falls back to the file
    other = write_dicom(tmp_path / "later.dcm", synthetic_frame(799, (24, 32))[0], extra={"PatientID": patient})
    importer([other, files[0]], project="q")
    importer([other, files[0]], project="r", use_patient_id=False)
    with factory() as s:
        by_project = {
            name: {subj for (subj,) in s.execute(select(Image.subject).join(Project).where(Project.name == name))}
            for name in ("q", "r")
        }
    assert len(by_project["q"]) == 1 and len(by_project["r"]) == 2


def test_subject_from_folder_levels(tmp_path: Path, factory: SessionFactory, importer: Importer) -> None:
    for i, rel in enumerate(["pat1/visitA/x.png", "pat1/visitB/y.png", "pat2/visitA/z.png"]):
        write_png(tmp_path / "data" / rel, synthetic_frame(800 + i, (24, 24))[0])
    for project, rule, expected in (("lvl2", "2", 2), ("parent", "parent", 2), ("file", "file", 3)):
        importer([tmp_path / "data"], project=project, subject_from=rule)
        with factory() as s:
            subjects = s.scalars(select(Image.subject).join(Project).where(Project.name == project)).all()
        # lvl2: pat1 twice, pat2; parent: visitA twice (pat1 and pat2 share the folder name), visitB
        assert len(set(subjects)) == expected, project


@given(st.integers(min_value=-3, max_value=12) | st.sampled_from(["file", "parent", "FILE", " 2 ", "0", "x", ""]))
def test_subject_rule_parsing(value: int | str) -> None:
    text = str(value).strip().lower()
    valid = text in ("file", "parent") or (text.isdigit() and int(text) >= 1)
    if not valid:
        with pytest.raises(InvalidInput, match="subject-from"):
            SubjectRule.parse(value)
        return
    rule = SubjectRule.parse(value)
    assert rule.level == {"file": 0, "parent": 1}.get(text, int(text) if text.isdigit() else -1)


def test_subject_rule_past_the_root_is_a_per_file_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no folder 99"):
        SubjectRule(99).raw_subject(tmp_path / "a.png")


# -- the splits CSV ----------------------------------------------------------------------------------

_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)


@hsettings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(_NAMES, min_size=1, max_size=3).map(lambda parts: "/".join(parts) + ".png"),
            st.sampled_from(["train", "VAL", " test ", ""]),
            st.one_of(st.just(""), st.text(alphabet="ABC xyz,\"'é", max_size=8)),
        ),
        max_size=12,
        unique_by=lambda row: row[0],
    ),
    st.sampled_from([["file", "split", "subject"], ["Subject", " FILE ", "split", "notes"]]),
    st.booleans(),
)
def test_splits_csv_round_trip(rows: list[tuple[str, str, str]], header: list[str], bom: bool) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    names = [h.strip().lower() for h in header]
    for file, split, subject in rows:
        values = {"file": file.replace("/", "\\") if len(file) % 2 else file, "split": split, "subject": subject}
        writer.writerow([values.get(n, "n/a") for n in names])
        writer.writerow([])  # blank lines are skipped
    entries = parse_splits_csv(("\ufeff" if bom else "") + out.getvalue())
    assert [(e.file, e.split, e.subject) for e in entries] == [
        (file, split.strip().lower() or None, subject.strip() or None) for file, split, subject in rows
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("name,split\na.png,train\n", "needs a 'file' column"),
        ("file\na.png\n", "needs a 'file' column"),
        ("file,split,split\na.png,train,val\n", "more than once"),
        ("file,split\na.png,holdout\n", "line 2: unknown split 'holdout'"),
        ("file,split\na.png,train\n./a.png,val\n", "line 3: 'a.png' is already listed on line 2"),
        ("file,split\n/abs/a.png,train\n", "relative"),
        ("file,split\n../a.png,train\n", "relative"),
        ("file,split\n,train\n", "empty"),
    ],
)
def test_bad_splits_csv_is_refused(content: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_splits_csv(content)


def test_csv_matching_rules(tmp_path: Path) -> None:
    files = [
        (tmp_path / "p1" / "a.png", "p1/a.png"),
        (tmp_path / "p2" / "a.png", "p2/a.png"),
        (tmp_path / "b.png", "b.png"),
    ]
    entries = parse_splits_csv("file,split\np2/a.png,test\nb.png,val\n")
    matched = match_splits_csv(entries, files)
    assert {p: e.split for p, e in matched.items()} == {files[1][0]: "test", files[2][0]: "val"}
    with pytest.raises(InvalidInput, match="matches 2 imported files"):
        match_splits_csv(parse_splits_csv("file,split\na.png,test\n"), files)
    with pytest.raises(InvalidInput, match="not among the imported files.*nothing was imported"):
        match_splits_csv(parse_splits_csv("file,split\nc.png,test\n"), files)
    with pytest.raises(InvalidInput, match="same file as line 2"):
        match_splits_csv(parse_splits_csv("file,split\na.png,test\np1/a.png,val\n"), files[:1])


def test_splits_csv_import(tmp_path: Path, factory: SessionFactory, importer: Importer) -> None:
    from backend.services.images import pixel_hash

    root = tmp_path / "set"
    names = ["p1/a.png", "p1/b.png", "p2/c.png", "d.png"]
    sha = {}
    for i, rel in enumerate(names):
        img = synthetic_frame(900 + i, (24, 24))[0]
        write_png(root / rel, img)
        sha[rel] = pixel_hash(img)
    sheet = tmp_path / "splits.csv"
    sheet.write_text("File,Split,Subject,notes\r\np1/a.png,test,P1,x\r\nb.png,,P1,\r\n\r\nd.png,VAL,,\r\n")
    report = importer([root], splits_csv=sheet)
    assert report.errors == [] and report.froze_test
    with factory() as s:
        by_sha = {img.sha256: img for img in s.scalars(select(Image))}
    a, b, c, d = (by_sha[sha[rel]] for rel in names)
    assert (a.split, b.split, d.split) == ("test", "test", "val")  # b has no split cell: it follows subject P1
    assert c.split in ("train", "val")  # automatic, and the test split is frozen by now (a came first)
    assert a.subject == b.subject != c.subject
    # a CSV naming a file that is not imported refuses the whole import before anything is stored
    bad = tmp_path / "bad.csv"
    bad.write_text("file,split\nmissing.png,test\n")
    before = _splits(factory)
    other = tmp_path / "other"
    write_png(other / "e.png", synthetic_frame(950, (24, 24))[0])
    with pytest.raises(InvalidInput, match="missing.png"):
        importer([other], splits_csv=bad)
    assert _splits(factory) == before
    # a CSV split that would put a subject on both sides is a per-file error
    clash = tmp_path / "clash.csv"
    clash.write_text("file,split,subject\ne.png,train,P1\n")
    report = importer([other], splits_csv=clash)
    assert len(report.errors) == 1 and "already in test" in report.errors[0][1]


# -- masks: multi-frame, indexed once ----------------------------------------------------------------


def test_multi_frame_dicom_takes_a_multi_frame_mask(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, importer: Importer
) -> None:
    pytest.importorskip("pydicom")
    from tests.support.imaging import write_dicom

    pairs = [synthetic_frame(1000 + k, (24, 32)) for k in range(4)]
    cine = np.stack([img for img, _ in pairs])
    labels = np.stack([mask for _, mask in pairs])
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    write_dicom(tmp_path / "img" / "cine.dcm", cine, frames=4)
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "lbl" / "cine.nii.gz"))
    report = importer([tmp_path / "img"], mask_dir=tmp_path / "lbl")
    assert (report.images_added, report.masks_added, report.errors) == (4, 4, [])
    with factory() as s:
        for mv in s.scalars(select(MaskVersion).join(Image).order_by(Image.frame_index)):
            image = s.get(Image, mv.image_id)
            assert image is not None
            assert np.array_equal(read_mask(store, mv), labels[image.frame_index])


def test_multi_frame_volume_and_mismatched_masks(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, importer: Importer
) -> None:
    pairs = [synthetic_frame(1100 + k, (20, 28)) for k in range(3)]
    volume = np.stack([img for img, _ in pairs])
    labels = np.stack([mask for _, mask in pairs])
    for name in ("ok", "short", "flat"):
        sitk.WriteImage(sitk.GetImageFromArray(volume if name == "ok" else volume[::-1]), str(tmp_path / f"{name}.mha"))
    (tmp_path / "m").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "m" / "ok.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(labels[:2]), str(tmp_path / "m" / "short.nii"))
    (tmp_path / "m" / "flat.png").write_bytes(encode_png(labels[0]))
    paths = [tmp_path / f"{n}.mha" for n in ("ok", "short", "flat")]
    report = importer(paths, mask_dir=tmp_path / "m")
    assert (report.images_added, report.masks_added) == (3, 3)
    errors = dict(report.errors)
    assert "short.nii has 2 frames but short.mha has 3" in errors[str(paths[1])]
    assert "flat.png is a single-frame mask but flat.mha has 3 frames" in errors[str(paths[2])]
    with factory() as s:
        assert s.scalar(select(func.count(Image.id))) == 3  # the rejected files left nothing
    assert store.leftover_temp_files() == []


def test_mask_folder_is_listed_once_per_import(
    tmp_path: Path, importer: Importer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _frames(tmp_path, "d", 6, seed=1200, masks=True)
    listed: list[Path] = []
    original = Path.iterdir

    def counting(self: Path):  # type: ignore[no-untyped-def]
        listed.append(self)
        return original(self)

    monkeypatch.setattr(Path, "iterdir", counting)
    seen: list[ImportProgress] = []
    report = importer([data / "images"], mask_dir=data / "masks", on_item=seen.append)
    assert (report.images_added, report.masks_added) == (6, 6)
    assert [p for p in listed if p == data / "masks"] == [data / "masks"]
    assert [(p.done, p.total, p.ok) for p in seen] == [(i, 6, True) for i in range(1, 7)]


def test_files_inside_the_mask_folder_are_not_images(tmp_path: Path, importer: Importer) -> None:
    data = _frames(tmp_path, "d", 2, seed=1300, masks=True)
    report = importer([data], mask_dir=data / "masks")
    assert (report.files, report.images_added, report.masks_added) == (2, 2, 2)


def test_import_progress_lines_without_a_terminal(tmp_path: Path, db_url: str) -> None:
    env = {"SONOSEG_DATA_DIR": str(tmp_path / "data"), "SONOSEG_DATABASE_URL": db_url}
    data = _frames(tmp_path, "d", 3, seed=1400)
    out = CliRunner().invoke(cli, ["import", "--project", "p", str(data)], env=env)
    assert out.exit_code == 0, out.output
    assert "import: 3/3 files, 0 rejected" in out.output
    bad = CliRunner().invoke(cli, ["import", "--project", "p", "--subject-from", "up", str(data)], env=env)
    assert bad.exit_code == 2 and "folder level" in bad.output


# -- the shared dataset: its test/ folder stays the test split ---------------------------------------


def test_usgra_test_folder_stays_in_test(factory: SessionFactory, importer: Importer, shared_data: Path | None) -> None:
    if shared_data is None:
        pytest.skip("../shared/data/usgra-seg is absent")
    report = importer(
        [shared_data / "test" / "images"], project="usgra", mask_dir=shared_data / "test" / "masks", split="test"
    )
    assert (report.images_added, report.masks_added, report.errors) == (40, 40, [])
    train = sorted((shared_data / "images").glob("*.png"))[:20]
    importer(train, project="usgra")
    splits = _splits(factory)
    assert splits["test"] == 40 and splits.get("train", 0) + splits.get("val", 0) == 20


# -- nnU-Net datasets ----------------------------------------------------------------------------------


def test_nnunet_export_round_trips_splits_subjects_and_masks(tmp_path: Path, db_url: str) -> None:
    from backend.db.session import make_engine, make_session_factory
    from backend.services.formats.nnunet import export_nnunet

    env = {"SONOSEG_DATA_DIR": str(tmp_path / "data"), "SONOSEG_DATABASE_URL": db_url}
    runner = CliRunner()
    for folder, split, seed in (("t", "test", 1500), ("v", "val", 1600), ("r", "train", 1700)):
        data = _frames(tmp_path, folder, 3, seed=seed, masks=True)
        args = ["import", "--project", "src", "--split", split, "--masks", str(data / "masks"), str(data / "images")]
        assert runner.invoke(cli, args, env=env).exit_code == 0
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    store = LocalBlobStore(tmp_path / "data" / "store")
    with unit_of_work(factory) as s:
        export_nnunet(s, store, s.scalars(select(Project).where(Project.name == "src")).one(), tmp_path / "nn")
    out = runner.invoke(
        cli, ["import", "--project", "copy", "--format", "nnunet", "--split", "val", str(tmp_path / "nn")], env=env
    )
    assert out.exit_code == 2 and "--split does not apply" in out.output
    out = runner.invoke(
        cli, ["import", "--project", "copy", "--format", "nnunet", "--labels", "A,B", str(tmp_path / "nn")], env=env
    )
    assert out.exit_code == 1 and "the dataset's classes are Nerve, Vessel" in out.output
    out = runner.invoke(cli, ["import", "--project", "copy", "--format", "nnunet", str(tmp_path / "nn")], env=env)
    assert out.exit_code == 0, out.output
    assert "9 new image(s) (3 train, 3 val, 3 test)" in out.output and "9 mask(s)" in out.output
    with factory() as s:

        def rows(name: str) -> dict[str, tuple[str, str, str | None]]:
            query = select(Image).join(Project).where(Project.name == name)
            return {
                img.sha256: (img.subject, img.split, (current.sha256 if (current := _current(s, img)) else None))
                for img in s.scalars(query)
            }

        assert rows("copy") == rows("src")
        assert s.scalars(select(Project).where(Project.name == "copy")).one().test_frozen
    engine.dispose()


def _current(session: object, image: Image) -> MaskVersion | None:
    from backend.services.masks import current_mask_version

    return current_mask_version(session, image)  # type: ignore[arg-type]


def test_nnunet_without_validation_cases_is_split_by_subject(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, settings: Settings
) -> None:
    from backend.services.dataset import import_nnunet

    root = tmp_path / "Dataset007_Nerves"
    for i in range(48):  # enough subjects that the automatic assignment surely puts some in val
        img, mask = synthetic_frame(1800 + i, (24, 24))
        write_png(root / "imagesTr" / f"case{i:03d}_0000.png", img)
        write_png(root / "labelsTr" / f"case{i:03d}.png", mask)
    for i in range(2):
        write_png(root / "imagesTs" / f"held{i}_0000.png", synthetic_frame(1900 + i, (24, 24))[0])
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "US"},
                "labels": {"background": 0, "Nerve": 1, "Vessel": 2},
                "numTraining": 48,
                "file_ending": ".png",
            }
        )
    )
    report = import_nnunet(factory, store, settings, project_name="nn", root=tmp_path)
    assert (report.images_added, report.masks_added, report.errors) == (50, 48, [])
    assert report.added_by_split["test"] == 2 and report.froze_test
    assert report.added_by_split.get("train", 0) + report.added_by_split.get("val", 0) == 48
    assert report.added_by_split.get("val", 0) > 0  # the hash, not "everything in train"


# -- reading ahead in a process: what a failed file leaves behind ------------------------------------


def _store_matches_rows(factory: SessionFactory, store: LocalBlobStore) -> None:
    with factory() as s:
        referenced = set(s.scalars(select(Image.blob_key))) | set(s.scalars(select(MaskVersion.blob_key)))
    on_disk = {p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()}
    assert on_disk == referenced  # no orphan blob, no row without its blob
    assert store.leftover_temp_files() == []


def test_read_ahead_failures_leave_nothing_and_shared_blobs_survive(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, importer: Importer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enough files for the reader process; files failing in it or in their unit of work, some of
    them sharing an (empty) mask blob with files that succeed, before and after them."""
    from backend.services import dataset

    monkeypatch.setattr(dataset, "READ_AHEAD_MIN_FILES", 16)  # 24 files take the reader-process path
    root = tmp_path / "in"
    empty = np.zeros((24, 24), np.uint8)
    sheet = ["file,split,subject"]
    for i in range(24):
        img, mask = synthetic_frame(2000 + i, (24, 24))
        write_png(root / "images" / f"{i:02d}.png", img)
        write_png(root / "masks" / f"{i:02d}.png", empty if i % 3 == 0 else mask)
    sheet += [
        "07.png,test,P",  # imported first (test items are), so P is in test
        "00.png,train,P",  # refused in its unit of work; it was the first to write the empty mask blob
        "04.png,val,Q",
        "05.png,train,Q",  # refused
        "12.png,train,Q",  # refused, with the empty mask that 03, 06, 09 committed
    ]
    (root / "images" / "10.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # refused by the reader
    write_png(root / "masks" / "11.png", np.full((24, 24), 7, np.uint8))  # unknown class: refused when stored
    (tmp_path / "splits.csv").write_text("\n".join(sheet) + "\n")
    report = importer([root / "images"], mask_dir=root / "masks", splits_csv=tmp_path / "splits.csv")
    rejected = sorted(Path(path).name for path, _ in report.errors)
    assert rejected == ["00.png", "05.png", "10.png", "11.png", "12.png"], report.errors
    assert report.images_added == 19 and report.masks_added == 19
    _store_matches_rows(factory, store)
    # the same files again: nothing new, and still nothing left behind
    again = importer([root / "images"], mask_dir=root / "masks")
    assert again.images_added == 3 and sorted(Path(p).name for p, _ in again.errors) == ["10.png", "11.png"]
    _store_matches_rows(factory, store)


def test_blob_ledger_keeps_what_a_committed_file_uses(tmp_path: Path) -> None:
    """The interleaving the reader process makes possible, replayed by hand: C wrote a blob and fails,
    A (read before C failed) found it present, B (read after) wrote it again, A commits using it,
    then B fails. A's row must keep its blob."""
    from backend.services.dataset import _BlobLedger

    store = LocalBlobStore(tmp_path / "store")
    ledger = _BlobLedger(store)
    data = encode_png(np.zeros((4, 4), np.uint8))
    c_blob = store.put_bytes("masks", data, ".png")  # C's reader: created
    a_blob = store.put_bytes("masks", data, ".png")  # A's reader: present
    assert c_blob.created and not a_blob.created
    ledger.settle(0, ledger.adopt(0, [c_blob]))  # C fails: it was the only one holding the blob
    assert not store.exists(c_blob.key)
    b_blob = store.put_bytes("masks", data, ".png")  # B's reader: created again
    a = ledger.writes(1, [a_blob])
    assert not a.put_bytes("masks", data, ".png").created  # A's unit of work finds B's copy
    a.settle(committed=True)
    ledger.settle(2, ledger.adopt(2, [b_blob]))  # B fails
    assert store.exists(b_blob.key)
    d = ledger.writes(3, [])
    d_blob = d.put_bytes("images", encode_png(np.ones((4, 4), np.uint8)), ".png")
    d.settle(committed=False)  # a failed file's own new blob goes
    assert not store.exists(d_blob.key)

"""Exports in the formats people train with (png, nnU-Net v2, Label Studio tasks), and nnU-Net read back.

Through the real store and database: the nnU-Net layout and dataset.json are exact, its folds keep
each subject on one side, ``read_nnunet`` gives back the same pixels, masks, splits and subjects,
Label Studio brush RLE decodes to the stored mask, and a non-empty output folder is refused
without a file written.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import select

from backend.db.models import Image, ImageSource, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidInput
from backend.imaging.io import decode_png_bytes, encode_png
from backend.labelstudio.config import ClassMap, parse_label_config
from backend.labelstudio.results import results_to_mask
from backend.services.formats.labelstudio_json import export_labelstudio
from backend.services.formats.nnunet import CaseInfo, cross_validation_folds, export_nnunet, read_nnunet
from backend.services.formats.output_dir import fresh_output_dir
from backend.services.formats.png import MANIFEST_COLUMNS, export_png
from backend.services.images import SourceInfo, add_image
from backend.services.masks import add_mask_version
from backend.services.projects import get_or_create_project, get_project
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from cli.main import cli
from tests.support.frames import synthetic_frame

PROJECT = "Nerve block-2"  # a space and a dash: nnU-Net names must be sanitised
PREFIX = "Nerve_block_2"
CLASSES = ("Nerve", "Vessel")
# subject -> (split, frames): 1-3 frames per subject, so that grouping by subject matters
LAYOUT = {f"subj-{i:02d}": ("train" if i < 7 else "val" if i < 10 else "test", 1 + i % 3) for i in range(12)}


@dataclass(frozen=True)
class Stored:
    image_id: int
    subject: str
    split: str
    pixels: np.ndarray
    mask: np.ndarray | None
    source_ref: str


def _make_project(factory: SessionFactory, store: LocalBlobStore) -> list[Stored]:
    """12 subjects over train/val/test; one train and one test image unlabelled; the first image
    has a retired (inactive) first source, so its export reference is its second one."""
    stored: list[Stored] = []
    seed = 0
    with unit_of_work(factory) as session:
        project = get_or_create_project(session, PROJECT, class_names=CLASSES)
        for subject, (split, frames) in LAYOUT.items():
            for _ in range(frames):
                seed += 1
                pixels, mask = synthetic_frame(seed, size=(24, 32))
                ref = f"src-{seed:032x}"
                added = add_image(
                    session, store, project, pixels, subject=subject, source=SourceInfo("import", ref=ref)
                )
                added.image.split = split
                labelled = seed not in (2, 20)
                if labelled:
                    add_mask_version(session, store, project, added.image, mask, source="import", author="test")
                stored.append(Stored(added.image.id, subject, split, pixels, mask if labelled else None, ref))
        first = stored[0]
        image = session.get_one(Image, first.image_id)
        second_ref = "src-" + "f" * 32
        add_image(
            session, store, project, first.pixels, subject=first.subject, source=SourceInfo("import", ref=second_ref)
        )
        oldest = session.scalars(select(ImageSource).where(ImageSource.image_id == image.id).order_by(ImageSource.id))
        next(iter(oldest)).active = False
        stored[0] = Stored(first.image_id, first.subject, first.split, first.pixels, first.mask, second_ref)
    return stored


@pytest.fixture
def stored(factory: SessionFactory, store: LocalBlobStore) -> list[Stored]:
    return _make_project(factory, store)


def _case(item: Stored) -> str:
    return f"{PREFIX}_{item.image_id:06d}"


def _png(path: Path) -> np.ndarray:
    return np.asarray(decode_png_bytes(path.read_bytes()))


# -- nnU-Net ---------------------------------------------------------------------------------------
def test_nnunet_layout_and_dataset_json(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, stored: list[Stored]
) -> None:
    out = tmp_path / "nnunet"
    with unit_of_work(factory) as session:
        report = export_nnunet(session, store, get_project(session, PROJECT), out, dataset_id=7)
    root = out / f"Dataset007_{PREFIX}"
    assert report.dataset_dir == root and [p.name for p in out.iterdir()] == [root.name]
    training = [s for s in stored if s.split != "test" and s.mask is not None]
    test = [s for s in stored if s.split == "test" and s.mask is not None]
    assert report.training_cases == len(training) and report.test_cases == len(test)
    assert report.skipped_unlabelled == 2 and report.test_unlabelled == 0 and report.folds == 5
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == sorted(f"{_case(s)}_0000.png" for s in training)
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == sorted(f"{_case(s)}.png" for s in training)
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == sorted(f"{_case(s)}_0000.png" for s in test)
    assert sorted(p.name for p in (root / "labelsTs").iterdir()) == sorted(f"{_case(s)}.png" for s in test)
    meta = json.loads((root / "dataset.json").read_text())
    description = meta.pop("description")
    assert meta == {
        "channel_names": {"0": "US"},
        "labels": {"background": 0, "Nerve": 1, "Vessel": 2},
        "numTraining": len(training),
        "file_ending": ".png",
        "name": PREFIX,
    }
    assert "splits_final.json" in description
    for s in training:  # consecutive uint8 labels, exactly the stored mask
        label = _png(root / "labelsTr" / f"{_case(s)}.png")
        assert label.dtype == np.uint8 and np.array_equal(label, s.mask)
        assert np.array_equal(_png(root / "imagesTr" / f"{_case(s)}_0000.png"), s.pixels)
    with open(root / "sonoseg_cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(r) for r in rows[:1]] == [["case", "image_id", "subject", "split"]]
    assert {(r["case"], int(r["image_id"]), r["subject"], r["split"]) for r in rows} == {
        (_case(s), s.image_id, s.subject, s.split) for s in [*training, *test]
    }


def test_nnunet_splits_final_keep_subjects_together(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, stored: list[Stored]
) -> None:
    with unit_of_work(factory) as session:
        report = export_nnunet(session, store, get_project(session, PROJECT), tmp_path / "out")
    folds = json.loads((report.dataset_dir / "splits_final.json").read_text())
    labelled = [s for s in stored if s.split != "test" and s.mask is not None]
    subject_of = {_case(s): s.subject for s in labelled}
    assert len(folds) == 5 and all(set(f) == {"train", "val"} for f in folds)
    assert folds[0] == {  # the project's own split is fold 0
        "train": sorted(_case(s) for s in labelled if s.split == "train"),
        "val": sorted(_case(s) for s in labelled if s.split == "val"),
    }
    for fold in folds:
        assert not {subject_of[c] for c in fold["train"]} & {subject_of[c] for c in fold["val"]}
    held_out = [c for fold in folds[1:] for c in fold["val"]]
    assert sorted(held_out) == sorted(subject_of)  # each training case validated exactly once in folds 1-4
    with unit_of_work(factory) as session:
        second = export_nnunet(session, store, get_project(session, PROJECT), tmp_path / "again")
    assert json.loads((second.dataset_dir / "splits_final.json").read_text()) == folds  # deterministic


_raw_cases = st.lists(
    st.tuples(st.integers(0, 9), st.sampled_from(["train", "train", "val", "test"])), min_size=0, max_size=40
)


@given(_raw_cases, st.integers(2, 6), st.randoms(use_true_random=False))
@hsettings(max_examples=200, deadline=None)
def test_cross_validation_folds_properties(raw: list[tuple[int, str]], n_folds: int, rnd: random.Random) -> None:
    # a subject's frames share a split in sonoseg: take each subject's first split
    split_of: dict[int, str] = {}
    cases = [CaseInfo(f"c{i:03d}", f"s{s}", split_of.setdefault(s, split)) for i, (s, split) in enumerate(raw)]
    folds = cross_validation_folds(cases, n_folds)
    shuffled = list(cases)
    rnd.shuffle(shuffled)
    assert cross_validation_folds(shuffled, n_folds) == folds  # deterministic, order-independent
    training = {c.case for c in cases if c.split != "test"}
    subject = {c.case: c.subject for c in cases}
    for fold in folds:
        assert not set(fold.train) & set(fold.val)
        assert not {subject[c] for c in fold.train} & {subject[c] for c in fold.val}
        assert set(fold.train) | set(fold.val) <= training
    val = tuple(sorted(c.case for c in cases if c.split == "val"))
    partition = folds[1:] if val else folds
    if val:
        assert folds[0].val == val and set(folds[0].train) == {c.case for c in cases if c.split == "train"}
    subjects = {subject[c] for c in training}
    expected = min(n_folds - (1 if val else 0), len(subjects))
    assert len(partition) == (expected if expected >= 2 else 0)
    if partition:
        held = [c for fold in partition for c in fold.val]
        assert sorted(held) == sorted(training)  # every training case in exactly one partition val set
        for fold in partition:
            assert set(fold.train) == training - set(fold.val) and fold.val


def test_read_nnunet_round_trip(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, stored: list[Stored]
) -> None:
    with unit_of_work(factory) as session:
        report = export_nnunet(session, store, get_project(session, PROJECT), tmp_path / "out", include_unlabelled=True)
    assert report.test_unlabelled == 1 and report.skipped_unlabelled == 1  # the unlabelled test image is kept
    for root in (report.dataset_dir, tmp_path / "out"):  # the dataset folder, or the folder holding it
        dataset = read_nnunet(root)
        assert dataset.name == PREFIX and dataset.class_names == CLASSES
        by_case = {item.case: item for item in dataset.items}
        exported = [s for s in stored if s.mask is not None or s.split == "test"]
        assert sorted(by_case) == sorted(_case(s) for s in exported)
        for s in exported:
            item = by_case[_case(s)]
            assert (item.split, item.subject) == (s.split, s.subject)
            assert np.array_equal(_png(item.image), s.pixels)
            if s.mask is None:
                assert item.mask is None
            else:
                assert item.mask is not None and np.array_equal(_png(item.mask), s.mask)


def _minimal_dataset(root: Path, **meta: object) -> Path:
    folder = root / "Dataset002_Tiny"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    pixels, mask = synthetic_frame(1, size=(16, 16))
    (folder / "imagesTr" / "a_0000.png").write_bytes(encode_png(pixels))
    (folder / "labelsTr" / "a.png").write_bytes(encode_png(mask))
    base: dict[str, object] = {
        "channel_names": {"0": "US"},
        "labels": {"background": 0, "Nerve": 1, "Vessel": 2},
        "numTraining": 1,
        "file_ending": ".png",
    }
    base.update(meta)
    (folder / "dataset.json").write_text(json.dumps(base))
    return folder


def test_read_nnunet_foreign_dataset(tmp_path: Path) -> None:
    """A dataset not made by sonoseg: no subjects, no splits file, every training case is 'train'."""
    dataset = read_nnunet(_minimal_dataset(tmp_path, labels={"Vessel": 2, "background": 0, "Nerve": 1}))
    assert dataset.name == "Tiny" and dataset.class_names == ("Nerve", "Vessel")  # by value, not key order
    assert [(i.case, i.split, i.subject) for i in dataset.items] == [("a", "train", None)]


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"channel_names": {"0": "T2", "1": "ADC"}}, "2 channels"),
        ({"labels": {"background": 0, "Nerve": 1, "Vessel": 3}}, "consecutive"),
        ({"labels": {"background": 0, "Nerve": 1, "both": [1, 2]}}, "region"),
        ({"labels": {"background": 0}}, "at least one class"),
        ({"file_ending": ".nrrd"}, "file_ending"),
        ({"numTraining": 3}, "numTraining=3"),
        ({"channel_names": None, "modality": {"0": "US"}}, "v1"),
    ],
)
def test_read_nnunet_refuses_what_it_cannot_import(tmp_path: Path, meta: dict[str, object], message: str) -> None:
    folder = _minimal_dataset(tmp_path)
    data = json.loads((folder / "dataset.json").read_text())
    data.update(meta)
    if data.get("channel_names") is None:
        del data["channel_names"]
    (folder / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(InvalidInput, match=message):
        read_nnunet(folder)


def test_read_nnunet_refuses_incomplete_folders(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no dataset.json"):
        read_nnunet(tmp_path)
    folder = _minimal_dataset(tmp_path / "one")
    (folder / "labelsTr" / "a.png").unlink()
    with pytest.raises(InvalidInput, match=r"without a label file: labelsTr/a\.png"):
        read_nnunet(folder)
    _minimal_dataset(tmp_path / "two")
    (tmp_path / "two" / "Dataset003_Other").mkdir()
    (tmp_path / "two" / "Dataset003_Other" / "dataset.json").write_text("{}")
    with pytest.raises(InvalidInput, match="several nnU-Net datasets"):
        read_nnunet(tmp_path / "two")
    folder = _minimal_dataset(tmp_path / "three")
    (folder / "imagesTr" / "a_0001.png").write_bytes(b"")
    with pytest.raises(InvalidInput, match="one channel"):
        read_nnunet(folder)


def test_nnunet_options_are_checked(tmp_path: Path, factory: SessionFactory, store: LocalBlobStore) -> None:
    with unit_of_work(factory) as session:
        project = get_or_create_project(session, PROJECT, class_names=CLASSES)
        with pytest.raises(InvalidInput, match="1..999"):
            export_nnunet(session, store, project, tmp_path / "a", dataset_id=1000)
        with pytest.raises(InvalidInput, match="letters, digits"):
            export_nnunet(session, store, project, tmp_path / "b", dataset_name="my data")
        with pytest.raises(InvalidInput, match="unknown split"):
            export_nnunet(session, store, project, tmp_path / "c", splits=("holdout",))
    assert not any((tmp_path / name).exists() for name in "abc")


# -- Label Studio ----------------------------------------------------------------------------------
def test_labelstudio_tasks_decode_to_the_stored_masks(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, stored: list[Stored]
) -> None:
    out = tmp_path / "ls"
    with unit_of_work(factory) as session:
        report = export_labelstudio(session, store, get_project(session, PROJECT), out, include_unlabelled=True)
    tasks = json.loads((out / "tasks.json").read_text())
    assert report.tasks == len(tasks) == len(stored) and report.annotated == len(stored) - 2
    config = parse_label_config((out / "label_config.xml").read_text())
    assert (config.from_name, config.to_name, config.labels) == ("tag", "image", CLASSES)
    by_id = {s.image_id: s for s in stored}
    for task in tasks:
        s = by_id[task["data"]["sonoseg_image_id"]]
        assert task["data"] == {
            "image": f"images/{s.image_id}.png",
            "sonoseg_image_id": s.image_id,
            "subject": s.subject,
            "split": s.split,
        }
        assert np.array_equal(_png(out / "images" / f"{s.image_id}.png"), s.pixels)
        if s.mask is None:
            assert "annotations" not in task
            continue
        [annotation] = task["annotations"]
        decoded = results_to_mask(annotation["result"], config, ClassMap(CLASSES), *s.pixels.shape)
        assert np.array_equal(decoded.mask, s.mask) and decoded.ignored_labels == ()


def test_labelstudio_uses_the_projects_own_config(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, stored: list[Stored]
) -> None:
    xml = (
        '<View><Image name="img" value="$frame"/><BrushLabels name="brush" toName="img">'
        '<Label value="Vessel"/><Label value="Nerve"/></BrushLabels></View>'
    )
    with unit_of_work(factory) as session:
        project = get_project(session, PROJECT)
        project.label_config = xml
        export_labelstudio(session, store, project, tmp_path / "ls", image_url_prefix="/data/local-files/?d=x/")
        project.label_config = xml.replace('<Label value="Nerve"/>', "")
        with pytest.raises(InvalidInput, match="has no label"):
            export_labelstudio(session, store, project, tmp_path / "refused")
        session.rollback()
    assert not (tmp_path / "refused").exists()
    config = parse_label_config(xml)
    task = next(t for t in json.loads((tmp_path / "ls" / "tasks.json").read_text()) if "annotations" in t)
    s = next(s for s in stored if s.image_id == task["data"]["sonoseg_image_id"])
    assert task["data"]["frame"] == f"/data/local-files/?d=x/{s.image_id}.png"
    decoded = results_to_mask(task["annotations"][0]["result"], config, ClassMap(CLASSES), *s.pixels.shape)
    assert np.array_equal(decoded.mask, s.mask)


# -- png -------------------------------------------------------------------------------------------
def test_png_include_unlabelled_and_source_ref(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, stored: list[Stored]
) -> None:
    with unit_of_work(factory) as session:
        project = get_project(session, PROJECT)
        default = export_png(session, store, project, tmp_path / "labelled")
        every = export_png(session, store, project, tmp_path / "all", include_unlabelled=True, splits=("train",))
    assert (default.pairs, default.unlabelled) == (len(stored) - 2, 0)
    train = [s for s in stored if s.split == "train"]
    assert (every.pairs, every.unlabelled) == (len(train) - 1, 1)
    with open(tmp_path / "all" / "manifest.csv", newline="") as f:
        rows = {int(r["image_id"]): r for r in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == list(MANIFEST_COLUMNS)
    assert sorted(rows) == sorted(s.image_id for s in train)
    for s in train:
        row = rows[s.image_id]
        assert row["source_ref"] == s.source_ref and (row["subject"], row["split"]) == (s.subject, s.split)
        assert np.array_equal(_png(tmp_path / "all" / "images" / row["file"]), s.pixels)
        mask_file = tmp_path / "all" / "masks" / row["file"]
        if s.mask is None:
            assert (row["mask_version"], row["mask_source"]) == ("", "") and not mask_file.exists()
        else:
            assert (row["mask_version"], row["mask_source"]) == ("1", "import")
            assert np.array_equal(_png(mask_file), s.mask)


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        with pytest.raises(RuntimeError), fresh_output_dir(target):
            (target / "half.png").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


# -- the command -----------------------------------------------------------------------------------
@pytest.fixture
def env(settings: Settings, db_url: str) -> dict[str, str]:
    return {"SONOSEG_DATA_DIR": str(settings.data_dir), "SONOSEG_DATABASE_URL": db_url}


def test_cli_exports_each_format(tmp_path: Path, env: dict[str, str], stored: list[Stored]) -> None:
    runner = CliRunner()
    outputs = {}
    for fmt, extra, marker in (
        ("png", [], "manifest.csv"),
        ("nnunet", ["--dataset-id", "12", "--dataset-name", "Nerves"], "Dataset012_Nerves/dataset.json"),
        ("labelstudio", ["--image-url-prefix", "https://files.example/x/"], "tasks.json"),
    ):
        out = tmp_path / fmt
        result = runner.invoke(
            cli, ["export", "--project", PROJECT, "--out", str(out), "--format", fmt, *extra], env=env
        )
        assert result.exit_code == 0, result.output
        assert (out / marker).is_file(), result.output
        outputs[fmt] = result.output
    assert "copy it to $nnUNet_preprocessed/Dataset012_Nerves/" in outputs["nnunet"]
    assert "skipped 2 image(s) without a current label" in outputs["nnunet"]
    with open(tmp_path / "png" / "manifest.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(stored) - 2  # png stays the labelled-only default


def test_cli_refuses_a_non_empty_folder_untouched(tmp_path: Path, env: dict[str, str], stored: list[Stored]) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    runner = CliRunner()
    for fmt in ("png", "nnunet", "labelstudio"):
        result = runner.invoke(cli, ["export", "--project", PROJECT, "--out", str(out), "--format", fmt], env=env)
        assert result.exit_code == 1 and str(out) in result.output and "not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    wrong = runner.invoke(
        cli, ["export", "--project", PROJECT, "--out", str(tmp_path / "n"), "--dataset-id", "3"], env=env
    )
    assert wrong.exit_code == 2 and "--format nnunet only" in wrong.output
    too_big = runner.invoke(
        cli,
        ["export", "--project", PROJECT, "--out", str(tmp_path / "n"), "--format", "nnunet", "--dataset-id", "1000"],
        env=env,
    )
    assert too_big.exit_code == 1 and "1..999" in too_big.output and not (tmp_path / "n").exists()


def test_project_class_names_are_nnunet_labels(tmp_path: Path, factory: SessionFactory, store: LocalBlobStore) -> None:
    """A class called 'background' cannot be an nnU-Net label: refused before anything is written."""
    with unit_of_work(factory) as session:
        project = Project(name="odd", class_names=["background", "Nerve"])
        session.add(project)
        session.flush()
        with pytest.raises(InvalidInput, match="reserved"):
            export_nnunet(session, store, project, tmp_path / "odd")
    assert not (tmp_path / "odd").exists()

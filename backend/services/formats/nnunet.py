"""nnU-Net v2 raw datasets: written from a project, and read back (for ``sonoseg import --format nnunet``).

The layout follows nnU-Net's ``documentation/dataset_format.md``::

    DatasetNNN_Name/
        dataset.json              channel_names, labels, numTraining, file_ending (+ name, description)
        imagesTr/<case>_0000.png  labelled train- and val-split images (one channel: ``_0000``)
        labelsTr/<case>.png       their masks: uint8, 0 background, i = project.class_names[i-1]
        imagesTs/<case>_0000.png  the test split, held out (nnU-Net itself never reads it)
        labelsTs/<case>.png       the test masks, to score a trained model (not an nnU-Net folder)
        splits_final.json         cross-validation folds grouped by subject (:func:`cross_validation_folds`)
        sonoseg_cases.csv         case, image_id, subject, split: what nnU-Net's layout cannot hold

Decisions:

- The one channel is called ``"US"``. nnU-Net picks the normalisation from the channel name: only
  ``"CT"`` gets a dataset-wide intensity scheme, anything else per-image z-scoring, which is what
  ultrasound needs (gain, depth and probe change intensities frame by frame; there is no absolute
  scale like Hounsfield units).
- nnU-Net reads ``splits_final.json`` from ``nnUNet_preprocessed/DatasetNNN_Name/``, not from the
  raw folder: copy it there after ``nnUNetv2_plan_and_preprocess`` and before training. Without it
  nnU-Net draws random folds over cases, and a subject's frames (near duplicates) land on both
  sides of a fold, which inflates validation scores.
- Only labelled images go to ``imagesTr`` (nnU-Net needs a label for every training case);
  unlabelled train and val images are skipped and counted.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from backend.db.models import SPLIT_VALUES, Project
from backend.errors import InvalidInput
from backend.labelstudio.config import BACKGROUND, ClassMap
from backend.services.formats import OnItem, check_splits, sanitise_name, select_items
from backend.services.formats.output_dir import fresh_output_dir
from backend.storage.blobs import BlobStore

__all__ = [
    "CASES_FILE",
    "CHANNEL_NAME",
    "FILE_ENDING",
    "NUM_FOLDS",
    "SPLITS_FILE",
    "CaseInfo",
    "Fold",
    "NnunetDataset",
    "NnunetExport",
    "NnunetItem",
    "cross_validation_folds",
    "export_nnunet",
    "read_nnunet",
]

CHANNEL_NAME = "US"
FILE_ENDING = ".png"
NUM_FOLDS = 5
SPLITS_FILE = "splits_final.json"
CASES_FILE = "sonoseg_cases.csv"
CASES_COLUMNS = ("case", "image_id", "subject", "split")
READABLE_FILE_ENDINGS = (".png", ".bmp", ".tif", ".tiff", ".nii.gz", ".mha")
"""File endings both nnU-Net and backend.imaging read (2-D files expected; a volume is many frames)."""

_CHANNEL_SUFFIX = "_0000"
_DATASET_FOLDER = re.compile(r"Dataset(\d{3})_(\w+)")
_NAME = re.compile(r"[A-Za-z0-9_]+")


# -- folds ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseInfo:
    """A case as the fold scheme sees it."""

    case: str
    subject: str
    split: str


@dataclass(frozen=True)
class Fold:
    """One entry of ``splits_final.json``: case ids trained on, and validated on."""

    train: tuple[str, ...]
    val: tuple[str, ...]


def cross_validation_folds(cases: Sequence[CaseInfo], n_folds: int = NUM_FOLDS) -> tuple[Fold, ...]:
    """nnU-Net's cross-validation folds over the training cases (splits train and val), by subject.

    - When there are val-split cases, fold 0 is the project's own split (train: the train-split
      cases, val: the val-split cases), so nnU-Net's fold 0 validates on what sonoseg validates
      on and the split survives a round trip through ``splits_final.json``. Folds 1..n-1 are an
      (n-1)-way partition of all training cases.
    - Otherwise folds 0..n-1 are an n-way partition.

    Partitions group by subject: each subject's cases are all in one fold's val set, and each
    training case is in exactly one partition fold's val set, so no fold validates on a subject
    it trained on. Subjects go, largest first (ties by pseudonym), to the fold with the fewest
    cases so far: deterministic, and balanced in cases rather than subjects. With fewer subjects
    than partition folds there is one fold per subject; with fewer than two, no partition.
    Test-split cases are ignored.
    """
    if n_folds < 2:
        raise InvalidInput(f"cross-validation needs at least 2 folds, got {n_folds}")
    training = sorted((c for c in cases if c.split in ("train", "val")), key=lambda c: c.case)
    folds: list[Fold] = []
    val_cases = tuple(c.case for c in training if c.split == "val")
    if val_cases:
        folds.append(Fold(train=tuple(c.case for c in training if c.split == "train"), val=val_cases))
    every_case = [c.case for c in training]
    for held_out in _grouped_partition(training, n_folds - len(folds)):
        held = set(held_out)
        folds.append(Fold(train=tuple(c for c in every_case if c not in held), val=tuple(sorted(held_out))))
    return tuple(folds)


def _grouped_partition(cases: Sequence[CaseInfo], groups: int) -> list[list[str]]:
    by_subject: dict[str, list[str]] = {}
    for case in cases:
        by_subject.setdefault(case.subject, []).append(case.case)
    groups = min(groups, len(by_subject))
    if groups < 2:
        return []
    parts: list[list[str]] = [[] for _ in range(groups)]
    for subject in sorted(by_subject, key=lambda s: (-len(by_subject[s]), s)):
        smallest = min(range(groups), key=lambda i: (len(parts[i]), i))
        parts[smallest].extend(by_subject[subject])
    return parts


# -- writing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NnunetExport:
    dataset_dir: Path  # out_dir / DatasetNNN_Name
    training_cases: int  # imagesTr (= numTraining)
    test_cases: int  # imagesTs
    test_unlabelled: int  # of those, without labelsTs (include_unlabelled)
    skipped_unlabelled: int  # images without a current label, not written
    folds: int  # entries in splits_final.json (0: not written, too few subjects)


def export_nnunet(
    session: Session,
    store: BlobStore,
    project: Project,
    out_dir: Path,
    *,
    splits: tuple[str, ...] = SPLIT_VALUES,
    dataset_id: int = 1,
    dataset_name: str | None = None,
    include_unlabelled: bool = False,
    on_item: OnItem | None = None,
) -> NnunetExport:
    """Write ``out_dir/DatasetNNN_Name/`` (see the module docstring) from the project's current labels.

    ``dataset_name`` defaults to the project name reduced to ``[A-Za-z0-9_]``; a given one must
    already be. Case ids are ``<sanitised project name>_<image id:06d>``. ``include_unlabelled``
    adds unlabelled test images to ``imagesTs`` (for inference); unlabelled train and val images
    are always skipped. ``out_dir`` must be new or empty.
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise InvalidInput(f"the nnU-Net dataset id must be 1..999 (three digits), got {dataset_id!r}")
    name = _dataset_name(project, dataset_name)
    class_map = _class_map(project)
    prefix = sanitise_name(project.name, fallback="case")
    splits = check_splits(splits)  # before the folder is made: a typo writes nothing
    with fresh_output_dir(out_dir):
        items = select_items(session, project, splits=splits, include_unlabelled=True)
        root = out_dir / f"Dataset{dataset_id:03d}_{name}"
        for folder in ("imagesTr", "labelsTr"):
            (root / folder).mkdir(parents=True)
        cases: list[CaseInfo] = []
        rows: list[tuple[str, int, str, str]] = []
        training = test = test_unlabelled = skipped = 0
        for item in items:
            held_out = item.split == "test"
            if item.mask_key is None and not (held_out and include_unlabelled):
                skipped += 1
                continue
            case = f"{prefix}_{item.image_id:06d}"
            images, labels = (
                (root / "imagesTs", root / "labelsTs") if held_out else (root / "imagesTr", root / "labelsTr")
            )
            images.mkdir(exist_ok=True)
            (images / f"{case}{_CHANNEL_SUFFIX}{FILE_ENDING}").write_bytes(store.get_bytes(item.image_key))
            if item.mask_key is not None:
                labels.mkdir(exist_ok=True)
                # stored masks are already uint8 class-index PNGs in project.class_names order
                (labels / f"{case}{FILE_ENDING}").write_bytes(store.get_bytes(item.mask_key))
            if held_out:
                test += 1
                test_unlabelled += 1 if item.mask_key is None else 0
            else:
                training += 1
            cases.append(CaseInfo(case, item.subject, item.split))
            rows.append((case, item.image_id, item.subject, item.split))
            if on_item is not None:
                on_item()
        _write_json(root / "dataset.json", _dataset_json(project, name, class_map, training))
        folds = cross_validation_folds(cases)
        if folds:
            _write_json(root / SPLITS_FILE, [{"train": list(f.train), "val": list(f.val)} for f in folds])
        with open(root / CASES_FILE, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CASES_COLUMNS)
            writer.writerows(rows)
    return NnunetExport(
        dataset_dir=root,
        training_cases=training,
        test_cases=test,
        test_unlabelled=test_unlabelled,
        skipped_unlabelled=skipped,
        folds=len(folds),
    )


def _dataset_name(project: Project, given: str | None) -> str:
    if given is None:
        return sanitise_name(project.name, fallback="sonoseg")
    if not _NAME.fullmatch(given):
        raise InvalidInput(
            f"the nnU-Net dataset name may hold only letters, digits and '_' (it becomes the folder "
            f"DatasetNNN_<name>), got {given!r}"
        )
    return given


def _class_map(project: Project) -> ClassMap:
    """The class map nnU-Net's ``labels`` come from; refuses names it could not hold (e.g. 'background')."""
    return ClassMap(tuple(project.class_names))


def _dataset_json(project: Project, name: str, class_map: ClassMap, training: int) -> dict[str, Any]:
    labels = {BACKGROUND: 0, **{label: index for index, label in enumerate(class_map.labels, start=1)}}
    return {
        "channel_names": {"0": CHANNEL_NAME},
        "labels": labels,
        "numTraining": training,
        "file_ending": FILE_ENDING,
        "name": name,
        "description": (
            f"sonoseg export of project {project.name!r}. Subjects and splits: {CASES_FILE}. "
            f"Copy {SPLITS_FILE} to nnUNet_preprocessed/<this folder>/ before training (subject-grouped folds)."
        ),
    }


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# -- reading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NnunetItem:
    """One case of an nnU-Net dataset: its single-channel image file and its label file, if any.

    ``split``: 'test' (imagesTs), 'val' (imagesTr, in fold 0's val of ``splits_final.json``) or
    'train'. ``subject``: the pseudonym from ``sonoseg_cases.csv``, else None (not a sonoseg export).
    """

    case: str
    image: Path
    mask: Path | None
    split: str
    subject: str | None


@dataclass(frozen=True)
class NnunetDataset:
    name: str  # the Name of DatasetNNN_Name
    class_names: tuple[str, ...]  # labels 1..K in value order, background excluded
    items: tuple[NnunetItem, ...]  # imagesTr cases (sorted), then imagesTs cases (sorted)


def read_nnunet(root: Path) -> NnunetDataset:
    """Read an nnU-Net v2 raw dataset: the ``DatasetNNN_Name`` folder, or a folder holding exactly one.

    Only file paths are returned (decoding is the importer's, within its size limits). Refused,
    with :class:`~backend.errors.InvalidInput` saying what is wrong: no ``dataset.json``; more
    than one channel (sonoseg frames are single-channel grey); labels that are not the
    consecutive integers 0..K (or are region-based); a ``file_ending`` sonoseg cannot read;
    a training case without its label; ``numTraining`` disagreeing with ``imagesTr``.
    """
    folder = _dataset_folder(Path(root))
    meta = _load_json(folder / "dataset.json")
    if not isinstance(meta, dict):
        raise InvalidInput(f"{folder / 'dataset.json'} must hold a JSON object")
    _check_channels(meta, folder)
    class_names = _class_names(meta, folder)
    ending = _file_ending(meta, folder)
    training = _cases(folder / "imagesTr", ending, required=True)
    expected = meta.get("numTraining")
    if expected is not None and (isinstance(expected, bool) or expected != len(training)):
        raise InvalidInput(
            f"{folder.name}/dataset.json says numTraining={expected!r} but imagesTr holds {len(training)} case(s); "
            "the copy may be incomplete"
        )
    val = _fold0_val(folder / SPLITS_FILE)
    subjects = _subjects(folder / CASES_FILE)
    items: list[NnunetItem] = []
    missing: list[str] = []
    for case, image in training:
        mask = folder / "labelsTr" / f"{case}{ending}"
        if not mask.is_file():
            missing.append(case)
        split = "val" if case in val else "train"
        items.append(NnunetItem(case=case, image=image, mask=mask, split=split, subject=subjects.get(case)))
    if missing:
        shown = ", ".join(f"labelsTr/{case}{ending}" for case in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidInput(f"{folder.name}: training cases without a label file: {shown}{more}")
    for case, image in _cases(folder / "imagesTs", ending, required=False):
        label = folder / "labelsTs" / f"{case}{ending}"
        mask_or_none = label if label.is_file() else None
        items.append(NnunetItem(case=case, image=image, mask=mask_or_none, split="test", subject=subjects.get(case)))
    match = _DATASET_FOLDER.fullmatch(folder.name)
    declared = meta.get("name")
    name = match.group(2) if match else (declared if isinstance(declared, str) and declared else folder.name)
    return NnunetDataset(name=name, class_names=class_names, items=tuple(items))


def _dataset_folder(root: Path) -> Path:
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a folder; give an nnU-Net dataset folder (DatasetNNN_Name)")
    if (root / "dataset.json").is_file():
        return root
    found = sorted(
        child
        for child in root.iterdir()
        if child.is_dir() and _DATASET_FOLDER.fullmatch(child.name) and (child / "dataset.json").is_file()
    )
    if len(found) == 1:
        return found[0]
    if found:
        raise InvalidInput(
            f"{root} holds several nnU-Net datasets ({', '.join(f.name for f in found)}); give one of them"
        )
    raise InvalidInput(
        f"no dataset.json in {root}: not an nnU-Net v2 dataset folder (DatasetNNN_Name/ with dataset.json, "
        "imagesTr/, labelsTr/), nor a folder holding one"
    )


def _load_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    try:
        data: object = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path} is not valid JSON: {exc}") from exc
    return data


def _check_channels(meta: dict[str, Any], folder: Path) -> None:
    where = f"{folder.name}/dataset.json"
    channels = meta.get("channel_names")
    if channels is None:
        hint = " (it has 'modality': an nnU-Net v1 dataset; convert it with nnUNetv2_convert_old_nnUNet_dataset)"
        raise InvalidInput(f"{where} has no 'channel_names'{hint if 'modality' in meta else ''}")
    if not isinstance(channels, dict) or not channels:
        raise InvalidInput(f'{where}: \'channel_names\' must be an object like {{"0": "US"}}')
    if len(channels) > 1:
        listed = ", ".join(f"{key}={value}" for key, value in channels.items())
        raise InvalidInput(
            f"{where} declares {len(channels)} channels ({listed}); sonoseg images are single-channel grey, "
            "so multi-channel datasets cannot be imported. Export one channel as its own dataset."
        )
    if "0" not in channels:
        raise InvalidInput(f'{where}: the one channel must be channel "0" (files <case>_0000), got {list(channels)}')


def _class_names(meta: dict[str, Any], folder: Path) -> tuple[str, ...]:
    where = f"{folder.name}/dataset.json"
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InvalidInput(f"{where} needs 'labels' as an object of name -> integer, like {{\"background\": 0}}")
    for label, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InvalidInput(f"{where}: label {label!r} is a region ({value}); region-based labels are not supported")
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{where}: label {label!r} must be an integer, got {value!r}")
    ordered = sorted(labels.items(), key=lambda pair: pair[1])
    values = [value for _, value in ordered]
    if values != list(range(len(values))):
        raise InvalidInput(
            f"{where}: label values must be the consecutive integers 0..{len(values) - 1} with 0 the background, "
            f"got {values}"
        )
    if len(values) < 2:
        raise InvalidInput(f"{where} has only the background label; a segmentation dataset needs at least one class")
    try:
        return ClassMap(tuple(name for name, _ in ordered[1:])).labels
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc.message}") from exc


def _file_ending(meta: dict[str, Any], folder: Path) -> str:
    ending = meta.get("file_ending")
    if not isinstance(ending, str) or ending.lower() not in READABLE_FILE_ENDINGS:
        raise InvalidInput(
            f"{folder.name}/dataset.json has file_ending {ending!r}; sonoseg reads {', '.join(READABLE_FILE_ENDINGS)}"
        )
    return ending


def _cases(images: Path, ending: str, *, required: bool) -> list[tuple[str, Path]]:
    """(case, image file) for each ``<case>_0000<ending>`` in ``images``, by case id."""
    if not images.is_dir():
        if required:
            raise InvalidInput(f"{images.parent.name} has no {images.name}/ folder")
        return []
    suffix = f"{_CHANNEL_SUFFIX}{ending}"
    found: list[tuple[str, Path]] = []
    for path in sorted(images.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not path.name.endswith(ending):
            continue
        if not path.name.endswith(suffix) or len(path.name) == len(suffix):
            raise InvalidInput(
                f"{images.name}/{path.name} is not named <case>{suffix}: nnU-Net names each channel file "
                "<case>_XXXX and this dataset has the one channel 0000"
            )
        found.append((path.name[: -len(suffix)], path))
    return found


def _fold0_val(path: Path) -> frozenset[str]:
    if not path.is_file():
        return frozenset()
    data = _load_json(path)
    if not isinstance(data, list):
        raise InvalidInput(f'{path.name} must be a list of folds like [{{"train": [...], "val": [...]}}]')
    if not data:
        return frozenset()
    first = data[0]
    val = first.get("val") if isinstance(first, dict) else None
    if not isinstance(val, list) or not all(isinstance(case, str) for case in val):
        raise InvalidInput(f"{path.name}: fold 0 needs 'val' as a list of case ids")
    return frozenset(val)


def _subjects(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"case", "subject"} <= set(reader.fieldnames):
                raise InvalidInput(f"{path.name} needs the columns 'case' and 'subject'")
            return {row["case"]: row["subject"] for row in reader if row.get("case") and row.get("subject")}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc

"""Curators' dataset operations: import files from disk (exports: :mod:`backend.services.formats`).

Import reads every supported format through backend.imaging (each DICOM cine frame or volume
slice becomes one image), deduplicates by pixel hash, assigns the split by subject, and stores an
optional mask per image as an 'import' mask version. One file is one unit of work: a bad file is
reported and skipped, and leaves nothing behind in the database or the store. Bad options (an
unknown split, a splits CSV that does not parse or names files that are not imported) are refused
before anything is imported.

Per file, in this order of precedence:

- **split**: the splits CSV's ``split`` cell; else ``split`` (``--split``); else automatic
  (:func:`backend.services.splits.split_for_new_image`: the subject's split, else the hash; never
  test once the project's test split is frozen). Putting images into test freezes it.
- **subject** (a raw identifier, pseudonymised with the installation key before anything is
  stored): the CSV's ``subject`` cell; else ``subject`` (``--subject``); else a DICOM file's
  PatientID (unless ``use_patient_id`` is off); else :class:`SubjectRule` (``--subject-from``).
  A curator-given subject that already is a pseudonym (``subj-<16 hex>``, as ``sonoseg export``
  and ``sonoseg split log`` show, or an nnU-Net export's ``sonoseg_cases.csv`` holds) names that
  subject as it is, so a CSV can refer to existing subjects and an export round-trips.

Masks: ``mask_dir`` is listed once per import (file stem -> mask). A multi-frame image (cine DICOM,
3D NIfTI/MetaImage) takes a multi-frame mask whose slice k labels frame k; a frame-count mismatch,
or a single-frame mask for a multi-frame file, rejects the file with the reason.

The splits CSV (``--splits-csv``): a header row naming ``file`` and ``split`` and/or ``subject``
(case-insensitive; other columns ignored; UTF-8, an Excel BOM is fine). ``file`` is either a path
relative to the folder given to the import (``patient01/cine.dcm``; a backslash is read as ``/``) or a
bare file name, matched against the imported files' names and refused when two imported files
share it. Every row must match exactly one imported file (a mistyped name would otherwise leave
its file to the automatic split); files without a row get the defaults. Empty cells mean "not
set".

Speed (``bench/bench_import.py``): the work per file is constant, so an import is linear in its
files: the mask folder is indexed once, the files' sessions share one connection (still one
transaction per file), and from :data:`READ_AHEAD_MIN_FILES` files on a reader process decodes
the next files and writes their blobs while this process does the database work
(:class:`_Reader`; :class:`_BlobLedger` keeps "a failed file leaves nothing behind" true).
Files that the curator puts into test are imported first, so the freeze they cause holds for the
rest of the same import.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import multiprocessing
import re
import signal
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from backend.db.models import Image, MaskVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidImage, InvalidInput, SonosegError
from backend.services.images import AddedImage, SourceInfo, add_image
from backend.services.label_issues import record_issue, resolve_issues
from backend.services.masks import add_mask_version, current_mask_version, mask_sha256
from backend.services.projects import DEFAULT_CLASSES, get_or_create_project
from backend.services.pseudonyms import load_or_create_key, pseudonymise, source_ref
from backend.services.splits import check_split, freeze_test
from backend.settings import Settings
from backend.storage.blobs import BlobStore, LocalBlobStore, StagedWrites, StoredBlob

if TYPE_CHECKING:
    from backend.imaging.budget import DecodeBudget
    from backend.imaging.io import LoadedImage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".nii.gz", ".mha", ".mhd")
_MAX_CSV_PROBLEMS = 10  # problems listed in one error message
_PSEUDONYM = re.compile(r"subj-[0-9a-f]{16}")


def subject_pseudonym(given: str, key: bytes) -> str:
    """A subject a curator names: a pseudonym (``subj-<16 hex>``) as it is, anything else pseudonymised."""
    return given if _PSEUDONYM.fullmatch(given) else pseudonymise(given, key)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _is_image_file(path: Path) -> bool:
    return path.is_file() and _suffix(path) in IMAGE_SUFFIXES and not path.name.startswith(".")


def iter_image_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files given directly, plus supported files found (recursively, sorted) in given folders."""
    for path, _ in _walk(paths):
        yield path


def _walk(paths: Iterable[Path], exclude: Path | None = None) -> Iterator[tuple[Path, str]]:
    """(file, its path relative to the folder it was found in, POSIX; a file given directly: its name).

    A file reached twice (a folder and the file itself) is listed once; files under ``exclude``
    (the mask folder) are not images.
    """
    seen: set[Path] = set()
    excluded = exclude.resolve() if exclude is not None else None

    def keep(path: Path) -> bool:
        resolved = path.resolve()
        if resolved in seen or (excluded is not None and resolved.is_relative_to(excluded)):
            return False
        seen.add(resolved)
        return True

    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if _is_image_file(child) and keep(child):
                    yield child, child.relative_to(path).as_posix()
        elif keep(path):
            yield path, path.name


# -- options: where subjects come from, the splits CSV ------------------------------------------------


@dataclass(frozen=True)
class SubjectRule:
    """Where a file's subject comes from when nothing more specific names it (``--subject-from``).

    ``level`` 0: the file itself (its resolved path: frames of one cine file stay together);
    ``level`` N >= 1: the name of the folder N levels above the file (1: its parent folder, for
    one folder per patient; 2: the folder above that, e.g. ``patient/visit/frame.png``).
    """

    level: int = 0

    def __post_init__(self) -> None:
        if self.level < 0:
            raise InvalidInput(f"the subject folder level must be >= 0, got {self.level}")

    @classmethod
    def parse(cls, value: str | int | SubjectRule) -> SubjectRule:
        """'file', 'parent' (= 1) or a folder level N (``--subject-from 2``)."""
        if isinstance(value, SubjectRule):
            return value
        text = str(value).strip().lower()
        if text == "file":
            return cls(0)
        if text == "parent":
            return cls(1)
        if text.isdigit() and int(text) >= 1:
            return cls(int(text))
        raise InvalidInput(
            f"--subject-from must be 'file', 'parent' or a folder level N >= 1 (1 = the parent folder), not {value!r}"
        )

    def raw_subject(self, path: Path) -> str:
        resolved = path.resolve()
        if self.level == 0:
            return str(resolved)
        parents = resolved.parents
        name = parents[self.level - 1].name if self.level <= len(parents) else ""
        if not name:
            raise InvalidInput(f"{path.name}: there is no folder {self.level} level(s) above it to name its subject")
        return name


@dataclass(frozen=True)
class CsvEntry:
    """One row of a splits CSV: ``file`` normalised (POSIX, no ``./``); None: the cell was empty."""

    file: str
    split: str | None
    subject: str | None
    line: int


def _normalise_csv_file(value: str) -> str:
    raw = value.strip().replace("\\", "/")
    path = PurePosixPath(raw)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{raw!r} must be relative to the imported folder (no leading '/', no '..')")
    text = path.as_posix()
    if text in ("", "."):
        raise ValueError("the file cell is empty")
    return text


def parse_splits_csv(text: str, name: str = "splits CSV") -> tuple[CsvEntry, ...]:
    """Parse and check a splits CSV (see the module docstring); every problem is an InvalidInput."""
    text = text.removeprefix("\ufeff")
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            raise InvalidInput(f"{name} is empty; it needs a header row with 'file' and 'split' and/or 'subject'")
        columns = [h.strip().lower() for h in header]
        duplicated = sorted({c for c in columns if c and columns.count(c) > 1})
        if duplicated:
            raise InvalidInput(f"{name}: the header names {', '.join(duplicated)} more than once")
        if "file" not in columns or not {"split", "subject"} & set(columns):
            raise InvalidInput(
                f"{name}: the header needs a 'file' column and a 'split' and/or 'subject' column, "
                f"found {', '.join(repr(c) for c in columns) or 'none'}"
            )
        at: dict[str, int] = {c: columns.index(c) for c in ("file", "split", "subject") if c in columns}
        entries: list[CsvEntry] = []
        problems: list[str] = []
        first_line: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # a blank line

            def cell(column: str, row: list[str] = row) -> str | None:
                i = at.get(column)
                value = row[i].strip() if i is not None and i < len(row) else ""
                return value or None

            try:
                file = _normalise_csv_file(cell("file") or "")
                split_cell = cell("split")
                split = check_split(split_cell) if split_cell is not None else None
            except (ValueError, InvalidInput) as exc:
                problems.append(f"line {line}: {exc.message if isinstance(exc, InvalidInput) else exc}")
                continue
            if file in first_line:
                problems.append(f"line {line}: {file!r} is already listed on line {first_line[file]}")
                continue
            first_line[file] = line
            entries.append(CsvEntry(file, split, cell("subject"), line))
    except csv.Error as exc:
        raise InvalidInput(f"{name} is not valid CSV: {exc}") from exc
    if problems:
        raise InvalidInput(_problems(name, problems))
    return tuple(entries)


def read_splits_csv(path: Path) -> tuple[CsvEntry, ...]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path.name} is not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from exc
    return parse_splits_csv(text, path.name)


def match_splits_csv(entries: Sequence[CsvEntry], files: Sequence[tuple[Path, str]]) -> dict[Path, CsvEntry]:
    """Each CSV row's file among ``files`` ((path, relative path) pairs, see the module docstring).

    Every row must match exactly one file, and no file two rows; otherwise an InvalidInput lists
    the problems (nothing has been imported yet).
    """
    by_rel: dict[str, list[Path]] = {}
    by_name: dict[str, list[Path]] = {}
    for path, rel in files:
        by_rel.setdefault(rel, []).append(path)
        by_name.setdefault(path.name, []).append(path)
    matched: dict[Path, CsvEntry] = {}
    problems: list[str] = []
    for entry in entries:
        candidates = by_rel.get(entry.file, []) if "/" in entry.file else by_name.get(entry.file, [])
        if not candidates:
            problems.append(f"line {entry.line}: {entry.file!r} is not among the imported files")
        elif len(candidates) > 1:
            problems.append(
                f"line {entry.line}: {entry.file!r} matches {len(candidates)} imported files; "
                "give its path relative to the imported folder"
            )
        elif candidates[0] in matched:
            problems.append(f"line {entry.line}: {entry.file!r} is the same file as line {matched[candidates[0]].line}")
        else:
            matched[candidates[0]] = entry
    if problems:
        raise InvalidInput(_problems("the splits CSV", problems))
    return matched


def _problems(name: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:_MAX_CSV_PROBLEMS])
    more = f" (and {len(problems) - _MAX_CSV_PROBLEMS} more)" if len(problems) > _MAX_CSV_PROBLEMS else ""
    return f"{name}: {shown}{more}; nothing was imported"


class MaskIndex:
    """The mask folder, listed once: file stem -> mask (the first by name when several share a stem)."""

    def __init__(self, mask_dir: Path | None) -> None:
        self._by_stem: dict[str, Path] = {}
        if mask_dir is None:
            return
        try:
            children = sorted(mask_dir.iterdir())
        except OSError as exc:
            raise InvalidInput(f"cannot list the mask folder {mask_dir.name}: {exc.strerror or exc}") from exc
        for candidate in children:
            if _suffix(candidate) in IMAGE_SUFFIXES and candidate.is_file():
                self._by_stem.setdefault(_stem(candidate), candidate)

    def find(self, image_path: Path) -> Path | None:
        return self._by_stem.get(_stem(image_path))


# -- the import ---------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    files: int = 0
    images_added: int = 0
    images_existing: int = 0
    masks_added: int = 0
    masks_unchanged: int = 0  # identical to the mask already stored for that file: no new version
    errors: list[tuple[str, str]] = field(default_factory=list)
    # (file, message): identical pixels to another file, different mask; neither is used until chosen
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    added_by_split: dict[str, int] = field(default_factory=dict)  # new images per split
    froze_test: bool = False  # this import froze the project's test split (curator-set test images)
    # When it did: test images of the project that this import did not put there (assigned by the
    # hash before the freeze, e.g. an earlier automatic import). They stay in test (frozen) unless
    # a curator moves them (`sonoseg split move`); the CLI says so.
    other_test_images: int = 0
    curated_test_ids: set[int] = field(default_factory=set, repr=False)  # images this import put in test


@dataclass(frozen=True)
class ImportProgress:
    """Reported after each file (``on_item``): ``ok`` False when the file was rejected."""

    done: int
    total: int
    path: Path
    ok: bool
    message: str | None = None


OnItem = Callable[[ImportProgress], None]


@dataclass(frozen=True)
class ImportItem:
    """One file to import, with what the curator said about it (raw subject: not yet pseudonymised)."""

    path: Path
    mask: Path | None = None
    split: str | None = None
    subject: str | None = None


@dataclass(frozen=True)
class ImportOptions:
    """How subjects are found when an item names none, and who is recorded if test gets frozen."""

    rule: SubjectRule = SubjectRule()
    use_patient_id: bool = True
    author: str = "import"


def import_files(
    factory: SessionFactory,
    store: BlobStore,
    settings: Settings,
    *,
    project_name: str,
    class_names: tuple[str, ...],
    paths: list[Path],
    mask_dir: Path | None = None,
    subject: str | None = None,
    subject_from: str | int | SubjectRule = "file",
    split: str | None = None,
    splits_csv: Path | None = None,
    use_patient_id: bool = True,
    author: str = "import",
    on_item: OnItem | None = None,
) -> ImportReport:
    """Import image files (and matching masks by file stem) into a project.

    See the module docstring for how each file's split, subject and mask are decided.
    ``subject``: one raw subject identifier for every file; ``subject_from``: 'file', 'parent' or
    a folder level (:class:`SubjectRule`). ``author`` is recorded when the import freezes the test
    split. ``on_item`` is called after each file. Workflow: one unit of work per file.

    Imports of :data:`READ_AHEAD_MIN_FILES` files or more decode in a reader process (``spawn``): a
    script calling this needs the usual ``if __name__ == "__main__":`` guard.
    """
    rule = SubjectRule.parse(subject_from)
    default_split = check_split(split) if split is not None else None
    entries = read_splits_csv(splits_csv) if splits_csv is not None else ()
    found = list(_walk(paths, exclude=mask_dir))
    by_file = match_splits_csv(entries, found) if entries else {}
    masks = MaskIndex(mask_dir)
    items = []
    for path, _ in found:
        entry = by_file.get(path)
        items.append(
            ImportItem(
                path,
                mask=masks.find(path),
                split=(entry.split if entry is not None else None) or default_split,
                subject=(entry.subject if entry is not None else None) or subject,
            )
        )
    return import_items(
        factory,
        store,
        settings,
        project_name=project_name,
        class_names=class_names,
        items=items,
        options=ImportOptions(rule, use_patient_id, author),
        on_item=on_item,
    )


def import_nnunet(
    factory: SessionFactory,
    store: BlobStore,
    settings: Settings,
    *,
    project_name: str,
    root: Path,
    class_names: tuple[str, ...] | None = None,
    subject_from: str | int | SubjectRule = "file",
    use_patient_id: bool = True,
    author: str = "import",
    on_item: OnItem | None = None,
) -> ImportReport:
    """Import an nnU-Net raw dataset folder (``dataset.json``, ``imagesTr``/``labelsTr``, ``imagesTs``).

    The dataset's own class names are used (``class_names``, when given, must equal them). Each
    case keeps the split the layout gives it (``imagesTs``: test, which freezes the test split),
    except that a dataset without any validation cases has its training cases assigned to train or
    val automatically by subject, since nnU-Net leaves validation to cross-validation. A case's
    subject is the reader's, else ``subject_from``.
    """
    from backend.services.formats.nnunet import read_nnunet

    rule = SubjectRule.parse(subject_from)
    dataset = read_nnunet(root)
    names = tuple(dataset.class_names)
    if class_names is not None and tuple(class_names) != names:
        raise InvalidInput(
            f"{root.name}: the dataset's classes are {', '.join(names)}, not {', '.join(class_names)}; "
            "leave --labels out to use the dataset's"
        )
    has_val = any(item.split == "val" for item in dataset.items)
    items = [
        ImportItem(
            Path(item.image),
            mask=Path(item.mask) if item.mask is not None else None,
            split=None if (item.split == "train" and not has_val) else item.split,
            subject=item.subject,
        )
        for item in dataset.items
    ]
    return import_items(
        factory,
        store,
        settings,
        project_name=project_name,
        class_names=names,
        items=items,
        options=ImportOptions(rule, use_patient_id, author),
        on_item=on_item,
    )


def import_items(
    factory: SessionFactory,
    store: BlobStore,
    settings: Settings,
    *,
    project_name: str,
    class_names: tuple[str, ...] = DEFAULT_CLASSES,
    items: Sequence[ImportItem],
    options: ImportOptions | None = None,
    on_item: OnItem | None = None,
) -> ImportReport:
    """Import prepared items, one unit of work per file (a failed file leaves nothing behind).

    Items the curator puts into test are imported first, so that the freeze they cause already
    holds for the automatically assigned items of the same import (whatever their order).
    """
    from backend.imaging.budget import shared_budget

    items = sorted(items, key=lambda item: item.split != "test")  # stable: otherwise in the given order
    options = options or ImportOptions()
    key = load_or_create_key(settings.data_dir)
    budget = shared_budget(settings.decode_memory_bytes)
    with unit_of_work(factory) as session:
        project_id = get_or_create_project(session, project_name, class_names=class_names).id
    report = ImportReport()
    total = len(items)

    ledger = _BlobLedger(store)
    reader = _Reader(settings, options, key, budget, ledger)
    with _one_connection(factory) as per_file, closing(reader.read(items)) as reads:
        for done, (owner, item, result) in enumerate(reads, start=1):
            report.files += 1
            message: str | None = None
            try:
                _store_one(per_file, ledger, owner, project_id, item, result(), options, report)
            except SonosegError as exc:
                message = exc.message
                log.warning("skipped %s: %s", item.path, exc.message)
                report.errors.append((str(item.path), exc.message))
            if on_item is not None:
                on_item(ImportProgress(done, total, item.path, message is None, message))
    if report.froze_test:
        with unit_of_work(factory) as session:
            in_test = session.scalar(
                select(func.count(Image.id)).where(Image.project_id == project_id, Image.split == "test")
            )
        report.other_test_images = max(0, (in_test or 0) - len(report.curated_test_ids))
    return report


@contextmanager
def _one_connection(factory: SessionFactory) -> Iterator[SessionFactory]:
    """The factory's sessions on one connection, held for the whole import (still one transaction
    per file). Opening a connection per file cost more than the file: with SQLite's WAL, closing
    the last connection checkpoints the log every time. Between files the connection holds no
    transaction, so other writers are not blocked."""
    bind = factory.kw.get("bind")
    if not isinstance(bind, Engine):
        yield factory
        return
    with bind.connect() as connection:
        yield sessionmaker(**{**factory.kw, "bind": connection})


# -- reading ahead, and the blobs written ahead ----------------------------------------------------------

READ_AHEAD_MIN_FILES = 64  # below this, starting the reader process (a fresh interpreter) costs more than it saves
READ_AHEAD = 2  # files queued for the reader: it and the importer take turns being the slower one


@dataclass(frozen=True)
class _ReadFile:
    """One file, decoded: digest, frames, masks (F, H, W), subject pseudonym, source refs, and the
    blobs (grey PNGs of its frames and masks) the reader process already wrote to the store."""

    file_sha: str
    file_bytes: int
    frames: list[LoadedImage]
    masks: NDArray[Any] | None
    subject: str
    refs: tuple[str, ...]  # source_ref per frame
    blobs: tuple[StoredBlob, ...] = ()


class _ReadFailed(Exception):
    """A file the reader process could not read (``message``), with the blobs it wrote before failing."""

    def __init__(self, message: str, blobs: tuple[StoredBlob, ...]) -> None:
        super().__init__(message, blobs)
        self.message, self.blobs = message, blobs


def _read_one(
    item: ImportItem,
    settings: Settings,
    options: ImportOptions,
    key: bytes,
    budget: DecodeBudget,
    store: BlobStore | None = None,
) -> _ReadFile:
    """Read, check and decode one file and its mask; with ``store``, also write the grey PNGs that
    add_image and add_mask_version will store (their writes then find them), last, once the file
    has passed every check. No database."""
    from backend.imaging.io import encode_png, read_image, read_mask_frames

    path = item.path
    resolved = path.resolve()
    file_sha, file_bytes = _file_digest(path)
    frames = read_image(path, max_side=settings.max_image_side, max_bytes=settings.max_image_bytes, budget=budget)
    masks: NDArray[Any] | None = None
    if item.mask is not None:
        masks = read_mask_frames(item.mask, max_side=settings.max_image_side, budget=budget)
        _check_mask_frames(item.mask, masks.shape[0], path, len(frames))
    if item.subject is not None:
        subject = subject_pseudonym(item.subject, key)
    else:
        raw = frames[0].patient_id if options.use_patient_id else None
        subject = pseudonymise(raw or options.rule.raw_subject(path), key)
    refs = tuple(
        source_ref(str(resolved) + (f"#frame={frame.frame_index}" if len(frames) > 1 else ""), key) for frame in frames
    )
    frames = [replace(frame, patient_id=None) for frame in frames]  # used: gone before anything else
    blobs: list[StoredBlob] = []
    if store is not None:
        try:
            for k, frame in enumerate(frames):
                blobs.append(store.put_bytes("images", encode_png(frame.pixels), ".png"))
                if masks is not None:
                    blobs.append(store.put_bytes("masks", encode_png(masks[k]), ".png"))
        except (SonosegError, OSError) as exc:
            reason = exc.message if isinstance(exc, SonosegError) else f"cannot write to the store: {exc}"
            raise _ReadFailed(f"{path.name}: {reason}", tuple(blobs)) from exc
    return _ReadFile(file_sha, file_bytes, frames, masks, subject, refs, tuple(blobs))


_READER: dict[str, Any] = {}  # the reader process's settings, options, key, store and budget


def _reader_init(settings: Settings, options: ImportOptions, key: bytes, store: BlobStore | None) -> None:
    """Start of the reader process. It ignores Ctrl-C: the importer stops it and cleans up after it."""
    from backend.imaging.budget import shared_budget

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _READER.update(settings=settings, options=options, key=key, store=store)
    _READER["budget"] = shared_budget(settings.decode_memory_bytes)


def _read_job(item: ImportItem) -> _ReadFile:
    """:func:`_read_one` in the reader process; a per-file error comes back as :class:`_ReadFailed`."""
    try:
        return _read_one(
            item, _READER["settings"], _READER["options"], _READER["key"], _READER["budget"], _READER["store"]
        )
    except _ReadFailed:
        raise
    except SonosegError as exc:
        raise _ReadFailed(exc.message, ()) from None


class _BlobLedger:
    """Which blobs this import created that no committed file references yet (the importer's thread only).

    A failed file must leave nothing behind, but its blobs may have been written ahead by the
    reader process, and identical bytes (an empty mask, a duplicate frame) are one blob shared by
    several files. So a blob created during the import stays *pending* until a file whose rows
    reference it commits (then it is kept for good), and is deleted once every file that wrote or
    used it has failed. Blobs that existed before the import are never touched. Files are settled
    one after the other, in order, so the bookkeeping needs no locks; the reader's concurrent
    writes only ever find a blob present or absent, and a file's own unit of work writes again
    whatever it needs and does not find.
    """

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._pending: dict[str, set[int]] = {}  # key -> files that wrote or used it
        self._kept: set[str] = set()  # referenced by a committed file

    def adopt(self, owner: int, blobs: Iterable[StoredBlob]) -> set[str]:
        keys = set()
        for blob in blobs:
            keys.add(blob.key)
            if blob.key in self._kept:
                continue
            if blob.created:
                self._pending.setdefault(blob.key, set()).add(owner)
            elif blob.key in self._pending:
                self._pending[blob.key].add(owner)
        return keys

    def settle(self, owner: int, keys: Iterable[str], committed: Iterable[str] = ()) -> None:
        """``owner`` is done: ``committed`` are the keys its committed rows reference."""
        kept = set(committed)
        for key in keys:
            if key in kept:
                self._kept.add(key)
                self._pending.pop(key, None)
                continue
            users = self._pending.get(key)
            if users is None:
                continue
            users.discard(owner)
            if not users:
                del self._pending[key]
                self.store.delete(key)

    def writes(self, owner: int, blobs: Iterable[StoredBlob]) -> _FileWrites:
        return _FileWrites(self, owner, self.adopt(owner, blobs))


class _FileWrites(StagedWrites):
    """One file's store inside its unit of work: writes are recorded in the ledger."""

    def __init__(self, ledger: _BlobLedger, owner: int, keys: set[str]) -> None:
        super().__init__(ledger.store)
        self._ledger, self._owner, self._keys = ledger, owner, keys
        self._used: set[str] = set()

    def put_bytes(self, namespace: str, data: bytes, suffix: str = "") -> StoredBlob:
        blob = self.store.put_bytes(namespace, data, suffix)
        self._keys |= self._ledger.adopt(self._owner, [blob])
        self._used.add(blob.key)
        return blob

    def discard(self) -> None:
        self.settle(committed=False)

    def settle(self, *, committed: bool) -> None:
        self._ledger.settle(self._owner, self._keys, self._used if committed else ())


class _Reader:
    """Files read (decoded, and their blobs written) ahead, in a reader process.

    From :data:`READ_AHEAD_MIN_FILES` files on, the next files are read in a process of their own
    while the importer stores the current one, so decoding and blob writes (fsync) overlap the
    database work on two cores; a thread would not do, the decoders hold the GIL. At most
    :data:`READ_AHEAD` files are decoded at once besides the one being stored, all within the one
    decode budget of the reader process. A file that crashes the decoder (a fault in a native
    library) is a per-file error and a new reader process carries on (what it was writing may be
    left as a temp file, which ``sonoseg status`` reports). Few files, a daemonic process (which
    may not start children) or a process that is itself a child (a script without a main guard,
    re-imported by ``spawn``): files are read here, one after the other.
    """

    def __init__(
        self, settings: Settings, options: ImportOptions, key: bytes, budget: DecodeBudget, ledger: _BlobLedger
    ) -> None:
        self.settings, self.options, self.key, self.budget, self.ledger = settings, options, key, budget, ledger

    def read(self, items: Sequence[ImportItem]) -> Generator[tuple[int, ImportItem, Callable[[], _ReadFile]]]:
        """(owner, item, a call returning its read or raising its per-file error), in order."""
        me = multiprocessing.current_process()
        if len(items) < READ_AHEAD_MIN_FILES or me.daemon or multiprocessing.parent_process() is not None:
            for owner, item in enumerate(items):
                yield owner, item, partial(_read_one, item, self.settings, self.options, self.key, self.budget)
            return
        pool = self._pool()
        futures: dict[int, Future[_ReadFile]] = {
            j: pool.submit(_read_job, items[j]) for j in range(min(READ_AHEAD, len(items)))
        }
        try:
            for owner, item in enumerate(items):
                if owner + READ_AHEAD < len(items):
                    futures[owner + READ_AHEAD] = pool.submit(_read_job, items[owner + READ_AHEAD])
                future = futures.pop(owner)
                yield owner, item, partial(self._result, owner, future, item)
                if isinstance(future.exception(), BrokenProcessPool):  # this file crashed the reader
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = self._pool()
                    futures = {j: pool.submit(_read_job, items[j]) for j in futures}
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for owner, future in futures.items():  # read ahead, never stored (an interrupted import)
                if not future.cancelled():
                    self._forget(owner, future)

    def _pool(self) -> ProcessPoolExecutor:
        store = self.ledger.store if isinstance(self.ledger.store, LocalBlobStore) else None
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_reader_init,
            initargs=(self.settings, self.options, self.key, store),
        )

    def _result(self, owner: int, future: Future[_ReadFile], item: ImportItem) -> _ReadFile:
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise InvalidImage(f"{item.path.name}: the image decoder crashed on this file") from exc
        except _ReadFailed as exc:
            self.ledger.settle(owner, self.ledger.adopt(owner, exc.blobs))
            raise InvalidInput(exc.message) from None

    def _forget(self, owner: int, future: Future[_ReadFile]) -> None:
        exc = future.exception()
        blobs = exc.blobs if isinstance(exc, _ReadFailed) else () if exc is not None else future.result().blobs
        self.ledger.settle(owner, self.ledger.adopt(owner, blobs))


def _store_one(
    factory: SessionFactory,
    ledger: _BlobLedger,
    owner: int,
    project_id: int,
    item: ImportItem,
    read: _ReadFile,
    options: ImportOptions,
    report: ImportReport,
) -> None:
    """One file in one unit of work; ``report`` is only updated once it has committed. If anything
    fails, the blobs only this file brought are removed (see :class:`_BlobLedger`)."""
    writes = ledger.writes(owner, read.blobs)
    local = ImportReport()
    try:
        split = check_split(item.split) if item.split is not None else None
        _store_frames(factory, project_id, item, read, split, writes, options, local)
    except BaseException:
        writes.settle(committed=False)
        raise
    writes.settle(committed=True)
    _merge(report, local)


def _store_frames(
    factory: SessionFactory,
    project_id: int,
    item: ImportItem,
    read: _ReadFile,
    split: str | None,
    staged: StagedWrites,
    options: ImportOptions,
    local: ImportReport,
) -> None:
    frames, masks, path = read.frames, read.masks, item.path
    with unit_of_work(factory) as session:
        project = session.get_one(Project, project_id)
        for frame, ref in zip(frames, read.refs, strict=True):
            added = add_image(
                session,
                staged,
                project,
                frame.pixels,
                subject=read.subject,
                source=SourceInfo("import", ref=ref, file_sha256=read.file_sha, file_bytes=read.file_bytes),
                source_format=frame.source_format,
                frame_index=frame.frame_index,
                acquisition=dict(frame.metadata),
                split=split,
            )
            if split == "test":
                local.curated_test_ids.add(added.image.id)
            if added.created:
                local.images_added += 1
                local.added_by_split[added.image.split] = local.added_by_split.get(added.image.split, 0) + 1
            else:
                local.images_existing += 1
            if masks is not None:
                outcome = _import_mask(session, staged, project, added, masks[frame.frame_index])
                if outcome == "added":
                    local.masks_added += 1
                elif outcome == "unchanged":
                    local.masks_unchanged += 1
                else:
                    local.conflicts.append((str(path), outcome))
        if split == "test":
            local.froze_test = freeze_test(
                session, project, author=options.author, reason="curator-set test images imported"
            )


def _merge(report: ImportReport, local: ImportReport) -> None:
    report.images_added += local.images_added
    report.images_existing += local.images_existing
    report.masks_added += local.masks_added
    report.masks_unchanged += local.masks_unchanged
    report.conflicts.extend(local.conflicts)
    for name, n in local.added_by_split.items():
        report.added_by_split[name] = report.added_by_split.get(name, 0) + n
    report.froze_test = report.froze_test or local.froze_test
    report.curated_test_ids |= local.curated_test_ids


def _check_mask_frames(mask: Path, mask_frames: int, image: Path, image_frames: int) -> None:
    if mask_frames == image_frames:
        return
    if mask_frames == 1:
        raise InvalidImage(
            f"{mask.name} is a single-frame mask but {image.name} has {image_frames} frames; give one label map "
            "per frame (a 3D NIfTI or MetaImage, as ITK-SNAP saves a cine segmentation)"
        )
    raise InvalidImage(
        f"{mask.name} has {mask_frames} frames but {image.name} has {image_frames}; slice k of the mask labels "
        "frame k of the image, so the counts must be equal"
    )


def _file_digest(path: Path) -> tuple[str, int]:
    """sha256 and size of a file's bytes: what lets a curator find its row again without its name."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    return digest.hexdigest(), size


def _import_mask(session: Session, store: StagedWrites, project: Project, added: AddedImage, mask: NDArray[Any]) -> str:
    """Store an imported file's mask: 'added', 'unchanged', or a conflict message.

    A conflict is a second file with the same pixels as an earlier one and a different mask
    (usgra-seg has such a pair). Taking whichever came last would silently pick one label, so
    both versions are kept, neither is current (the frame leaves training), and a label issue
    asks the curator to choose (`sonoseg masks choose`).
    """
    image, source = added.image, added.source
    if added.created:  # a new image has no label yet, so nothing to compare with or conflict with
        first = add_mask_version(
            session, store, project, image, mask, source="import", author="import", image_source_id=source.id
        )
        return "added" if first.created else "unchanged"
    sha = mask_sha256(mask)
    current = current_mask_version(session, image)
    if current is not None and current.sha256 == sha:
        return "unchanged"
    others = _latest_import_labels(session, image.id, exclude_source=source.id)
    conflicting = [mv for mv in others if mv.sha256 != sha]
    write = add_mask_version(
        session,
        store,
        project,
        image,
        mask,
        source="import",
        author="import",
        image_source_id=source.id,
        may_become_current=not conflicting,
    )
    if not write.created:  # this file's mask as stored before: any conflict is already recorded
        return "unchanged"
    if not conflicting:
        return "added"
    for mv in conflicting:
        mv.is_current = False
    session.flush()
    versions = sorted({mv.version for mv in conflicting} | {write.mask_version.version})
    message = (
        f"image {image.id} has identical pixels to another imported file but a different mask (versions "
        f"{', '.join(map(str, versions))}); neither is used for training until a curator runs "
        f"`sonoseg masks choose --image {image.id} --version N`"
    )
    resolve_issues(session, image.id, "conflicting_duplicate", "superseded by a newer conflict")
    record_issue(
        session,
        project_id=project.id,
        kind="conflicting_duplicate",
        detail=message,
        dedupe=(image.id, *sorted({mv.sha256 for mv in conflicting} | {sha})),
        image_id=image.id,
        mask_version_ids=sorted({mv.id for mv in conflicting} | {write.mask_version.id}),
    )
    return message


def _latest_import_labels(session: Session, image_id: int, *, exclude_source: int) -> list[MaskVersion]:
    """The newest active import version of each other imported file of this image."""
    rows = session.scalars(
        select(MaskVersion)
        .where(
            MaskVersion.image_id == image_id,
            MaskVersion.active,
            MaskVersion.source == "import",
            MaskVersion.image_source_id.is_not(None),
            MaskVersion.image_source_id != exclude_source,
        )
        .order_by(MaskVersion.version)
    ).all()
    latest: dict[int, MaskVersion] = {}
    for mv in rows:
        latest[mv.image_source_id or 0] = mv
    return list(latest.values())


__all__ = [
    "CsvEntry",
    "ImportItem",
    "ImportOptions",
    "ImportProgress",
    "ImportReport",
    "MaskIndex",
    "SubjectRule",
    "import_files",
    "import_items",
    "import_nnunet",
    "iter_image_files",
    "match_splits_csv",
    "parse_splits_csv",
    "read_splits_csv",
    "subject_pseudonym",
]

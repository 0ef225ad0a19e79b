"""``sonoseg import``: bring images (and masks) into a project."""

from __future__ import annotations

import getpass
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from backend.errors import SonosegError
from cli.context import CliContext, fail, pass_ctx

if TYPE_CHECKING:
    from backend.services.dataset import ImportProgress, ImportReport

SPLITS = ("train", "val", "test")


def os_user() -> str:
    """Who runs the command, for audit records when ``--by`` is not given."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


class SubjectFrom(click.ParamType[str, Any]):
    """``file``, ``parent`` or a folder level N >= 1 (1 = the parent folder)."""

    name = "file|parent|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text in ("file", "parent") or (text.isdigit() and int(text) >= 1):
            return text
        self.fail(f"{value!r}: expected 'file', 'parent' or a folder level N >= 1 (1 = the parent folder)", param, ctx)


@contextmanager
def progress_reporter() -> Iterator[Callable[[ImportProgress], None]]:
    """A progress bar (tqdm) when stderr is a terminal, else a plain line every 5% of the files."""
    bar: Any = None
    start = time.monotonic()
    rejected = 0

    def on_item(p: ImportProgress) -> None:
        nonlocal bar, rejected
        rejected += 0 if p.ok else 1
        if sys.stderr.isatty():
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=p.total, unit="file", file=sys.stderr, dynamic_ncols=True)
            bar.update(1)
            if rejected:
                bar.set_postfix(rejected=rejected, refresh=False)
            return
        step = max(1, p.total // 20)
        if p.done % step == 0 or p.done == p.total:
            rate = p.done / max(time.monotonic() - start, 1e-9)
            click.echo(f"import: {p.done}/{p.total} files, {rejected} rejected, {rate:.1f} files/s", err=True)

    if sys.stderr.isatty():
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            try:
                yield on_item
            finally:
                if bar is not None:
                    bar.close()
    else:
        yield on_item


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--project", "project_name", required=True, help="Project name (created if missing).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["files", "nnunet"]),
    default="files",
    show_default=True,
    help="files: image files and folders; nnunet: one nnU-Net raw dataset folder (dataset.json, imagesTr...).",
)
@click.option(
    "--labels",
    default=None,
    help="Class names, in class-index order [default: Nerve,Vessel; nnunet: the dataset's].",
)
@click.option(
    "--masks",
    "mask_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of masks matched to images by file stem (class-index PNG/NIfTI/MHA; 0/255 = class 1). "
    "A multi-frame image takes a multi-frame mask (slice k labels frame k).",
)
@click.option(
    "--split",
    type=click.Choice(SPLITS),
    default=None,
    help="Put every imported image in this split (test: also freezes the project's test split). "
    "Default: by subject, automatically.",
)
@click.option(
    "--splits-csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV with columns file and split and/or subject, per file (file: path relative to the given "
    "folder, or a unique file name); overrides --split and --subject for the files it lists.",
)
@click.option("--subject", default=None, help="One subject identifier for all files (pseudonymised before storing).")
@click.option(
    "--subject-from",
    type=SubjectFrom(),
    default="file",
    show_default=True,
    help="Subject of a file without --subject, a CSV subject or a DICOM PatientID: the file itself, its "
    "parent folder's name, or the folder N levels up (1 = parent, 2 = the parent's parent).",
)
@click.option(
    "--patient-id/--no-patient-id",
    "use_patient_id",
    default=True,
    show_default=True,
    help="Take a DICOM file's subject from its PatientID (pseudonymised; never stored in clear).",
)
@click.option("--by", "author", default=None, help="Who is recorded if the import freezes the test split [OS user].")
@pass_ctx
def import_cmd(
    c: CliContext,
    paths: tuple[Path, ...],
    project_name: str,
    fmt: str,
    labels: str | None,
    mask_dir: Path | None,
    split: str | None,
    splits_csv: Path | None,
    subject: str | None,
    subject_from: str,
    use_patient_id: bool,
    author: str | None,
) -> None:
    """Import images (PNG, JPEG, TIFF, BMP, DICOM incl. cine, NIfTI, MHA) and optional masks."""
    from backend.services.dataset import import_files, import_nnunet

    class_names = tuple(x.strip() for x in labels.split(",") if x.strip()) if labels is not None else None
    who = author or os_user()
    try:
        with progress_reporter() as on_item:
            if fmt == "nnunet":
                if len(paths) != 1 or not paths[0].is_dir():
                    raise click.UsageError("--format nnunet takes exactly one dataset folder")
                for option, value in (
                    ("--masks", mask_dir),
                    ("--split", split),
                    ("--splits-csv", splits_csv),
                    ("--subject", subject),
                ):
                    if value is not None:
                        raise click.UsageError(f"{option} does not apply to --format nnunet (the layout says)")
                report = import_nnunet(
                    c.factory,
                    c.store,
                    c.settings,
                    project_name=project_name,
                    root=paths[0],
                    class_names=class_names,
                    subject_from=subject_from,
                    use_patient_id=use_patient_id,
                    author=who,
                    on_item=on_item,
                )
            else:
                report = import_files(
                    c.factory,
                    c.store,
                    c.settings,
                    project_name=project_name,
                    class_names=class_names or ("Nerve", "Vessel"),
                    paths=list(paths),
                    mask_dir=mask_dir,
                    subject=subject,
                    subject_from=subject_from,
                    split=split,
                    splits_csv=splits_csv,
                    use_patient_id=use_patient_id,
                    author=who,
                    on_item=on_item,
                )
    except SonosegError as exc:
        raise fail(exc) from exc
    _print_report(report)
    if report.errors:
        sys.exit(1)


def _print_report(report: ImportReport) -> None:
    by_split = ", ".join(f"{n} {s}" for s in SPLITS if (n := report.added_by_split.get(s)))
    click.echo(
        f"{report.files} file(s): {report.images_added} new image(s){f' ({by_split})' if by_split else ''}, "
        f"{report.images_existing} already present, {report.masks_added} mask(s), {report.masks_unchanged} "
        f"mask(s) unchanged, {len(report.conflicts)} conflicting duplicate(s), {len(report.errors)} rejected"
    )
    if report.froze_test:
        click.echo("the project's test split is now frozen: new subjects go to train or val only")
        if report.other_test_images:
            click.echo(
                f"  note: {report.other_test_images} other image(s) were already in test by automatic assignment "
                "(before the freeze); they stay there unless moved (`sonoseg split show`, `sonoseg split move`)"
            )
    for path, message in report.conflicts:
        click.echo(f"  conflict {path}: {message}", err=True)
    for path, message in report.errors:
        click.echo(f"  rejected {path}: {message}", err=True)

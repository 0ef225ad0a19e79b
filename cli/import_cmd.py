"""``sonoseg import``: bring images (and masks) into a project."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from backend.errors import SonosegError
from cli.context import CliContext, fail, pass_ctx


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--project", "project_name", required=True, help="Project name (created if missing).")
@click.option("--labels", default="Nerve,Vessel", show_default=True, help="Class names, in class-index order.")
@click.option(
    "--masks",
    "mask_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of masks matched to images by file stem (class-index PNG/NIfTI/MHA; 0/255 = class 1).",
)
@click.option("--subject", default=None, help="One subject identifier for all files (pseudonymised before storing).")
@click.option(
    "--subject-from",
    type=click.Choice(["file", "parent"]),
    default="file",
    show_default=True,
    help="Where each file's subject comes from: the file itself, or its parent folder's name.",
)
@pass_ctx
def import_cmd(
    c: CliContext,
    paths: tuple[Path, ...],
    project_name: str,
    labels: str,
    mask_dir: Path | None,
    subject: str | None,
    subject_from: str,
) -> None:
    """Import images (PNG, JPEG, TIFF, BMP, DICOM incl. cine, NIfTI, MHA) and optional masks."""
    from backend.services.dataset import import_files

    class_names = tuple(x.strip() for x in labels.split(",") if x.strip())
    try:
        report = import_files(
            c.factory,
            c.store,
            c.settings,
            project_name=project_name,
            class_names=class_names,
            paths=list(paths),
            mask_dir=mask_dir,
            subject=subject,
            subject_from=subject_from,
        )
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(
        f"{report.files} file(s): {report.images_added} new image(s), {report.images_existing} already "
        f"present, {report.masks_added} mask(s), {report.masks_unchanged} mask(s) unchanged, "
        f"{len(report.conflicts)} conflicting duplicate(s), {len(report.errors)} rejected"
    )
    for path, message in report.conflicts:
        click.echo(f"  conflict {path}: {message}", err=True)
    for path, message in report.errors:
        click.echo(f"  rejected {path}: {message}", err=True)
    if report.errors:
        sys.exit(1)

"""``sonoseg export``: get a project's images and labels out, in the formats people train with.

The exporters live in :mod:`backend.services.formats`; this command opens the unit of work,
picks the format, shows progress (``cli.progress``) and prints the report.
"""

from __future__ import annotations

from pathlib import Path

import click

from backend.errors import SonosegError
from cli.context import CliContext, fail, pass_ctx
from cli.progress import progress_callback

FORMATS = ("png", "nnunet", "labelstudio")


@click.command("export")
@click.option("--project", "project_name", required=True, help="sonoseg project (name or id).")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A new or empty folder (a non-empty one is refused).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="png",
    show_default=True,
    help="png: images/, masks/, manifest.csv; nnunet: an nnU-Net v2 raw dataset; labelstudio: tasks.json.",
)
@click.option(
    "--split",
    "splits",
    multiple=True,
    type=click.Choice(["train", "val", "test"]),
    help="Only these splits (repeatable; default all).",
)
@click.option(
    "--include-unlabelled",
    is_flag=True,
    help="Also images without a current label (png: manifest row without mask; labelstudio: task without "
    "annotation; nnunet: test images only, in imagesTs).",
)
@click.option("--dataset-id", type=int, default=None, help="nnunet: the dataset id, 1..999  [default: 1]")
@click.option("--dataset-name", default=None, help="nnunet: [A-Za-z0-9_] name  [default: the project name, sanitised]")
@click.option(
    "--image-url-prefix",
    default=None,
    help="labelstudio: prefix of each task's image URL, e.g. /data/local-files/?d=export/images/  "
    "[default: images/, relative: serve DIR/images to Label Studio]",
)
@pass_ctx
def export_cmd(
    c: CliContext,
    project_name: str,
    out_dir: Path,
    fmt: str,
    splits: tuple[str, ...],
    include_unlabelled: bool,
    dataset_id: int | None,
    dataset_name: str | None,
    image_url_prefix: str | None,
) -> None:
    """Export a project's images and current label masks, with subjects and splits."""
    from backend.db.session import unit_of_work
    from backend.services.formats.labelstudio_json import DEFAULT_IMAGE_URL_PREFIX, export_labelstudio
    from backend.services.formats.nnunet import export_nnunet
    from backend.services.formats.output_dir import check_output_dir
    from backend.services.formats.png import export_png
    from backend.services.projects import get_project

    if fmt != "nnunet" and (dataset_id is not None or dataset_name is not None):
        raise click.UsageError("--dataset-id and --dataset-name apply to --format nnunet only")
    if fmt != "labelstudio" and image_url_prefix is not None:
        raise click.UsageError("--image-url-prefix applies to --format labelstudio only")
    wanted = splits or ("train", "val", "test")
    try:
        check_output_dir(out_dir)  # refuse before opening the database: a typo costs nothing
        with unit_of_work(c.factory) as session, progress_callback(f"export {fmt}", unit="image") as tick:
            project = get_project(session, project_name)
            if fmt == "nnunet":
                nn = export_nnunet(
                    session,
                    c.store,
                    project,
                    out_dir,
                    splits=wanted,
                    dataset_id=1 if dataset_id is None else dataset_id,
                    dataset_name=dataset_name,
                    include_unlabelled=include_unlabelled,
                    on_item=tick,
                )
                lines = [
                    f"exported nnU-Net dataset {nn.dataset_dir}: {nn.training_cases} training case(s), "
                    f"{nn.test_cases} test case(s) ({nn.test_unlabelled} without label)",
                    f"skipped {nn.skipped_unlabelled} image(s) without a current label"
                    if nn.skipped_unlabelled
                    else "",
                    f"splits_final.json: {nn.folds} subject-grouped fold(s); copy it to "
                    f"$nnUNet_preprocessed/{nn.dataset_dir.name}/ before training"
                    if nn.folds
                    else "no splits_final.json (no training cases, or all from one subject)",
                ]
            elif fmt == "labelstudio":
                ls = export_labelstudio(
                    session,
                    c.store,
                    project,
                    out_dir,
                    splits=wanted,
                    include_unlabelled=include_unlabelled,
                    image_url_prefix=DEFAULT_IMAGE_URL_PREFIX if image_url_prefix is None else image_url_prefix,
                    on_item=tick,
                )
                lines = [
                    f"exported {ls.tasks} Label Studio task(s) ({ls.annotated} with an annotation) to {ls.tasks_file}",
                    f"label config: {ls.label_config_file}; images in {out_dir / 'images'} must be served to "
                    "Label Studio at the --image-url-prefix",
                ]
            else:
                png = export_png(
                    session,
                    c.store,
                    project,
                    out_dir,
                    splits=wanted,
                    include_unlabelled=include_unlabelled,
                    on_item=tick,
                )
                lines = [
                    f"exported {png.pairs} image/mask pair(s)"
                    + (f" and {png.unlabelled} unlabelled image(s)" if include_unlabelled else "")
                    + f" to {out_dir}"
                ]
    except SonosegError as exc:
        raise fail(exc) from exc
    for line in lines:
        if line:
            click.echo(line)

"""``sonoseg export``: get a project's images and labels out."""

from __future__ import annotations

from pathlib import Path

import click

from backend.errors import SonosegError
from cli.context import CliContext, fail, pass_ctx


@click.command("export")
@click.option("--project", "project_name", required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--split",
    "splits",
    multiple=True,
    type=click.Choice(["train", "val", "test"]),
    help="Only these splits (repeatable; default all).",
)
@pass_ctx
def export_cmd(c: CliContext, project_name: str, out_dir: Path, splits: tuple[str, ...]) -> None:
    """Export labelled images, current masks and a manifest (subject, split, mask version)."""
    from backend.db.session import unit_of_work
    from backend.services.dataset import export_dataset
    from backend.services.projects import get_project

    try:
        with unit_of_work(c.factory) as session:
            project = get_project(session, project_name)
            n = export_dataset(session, c.store, project, out_dir, splits=splits or ("train", "val", "test"))
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(f"exported {n} image/mask pair(s) to {out_dir}")


# -- masks and sources --------------------------------------------------------------------------

"""``sonoseg project link|create-ls`` and ``sonoseg push``: a curated project into Label Studio."""

from __future__ import annotations

import json
import sys
from typing import cast

import click

from backend.errors import SonosegError
from backend.labelstudio.client import LabelStudioClient
from cli.context import CliContext, fail, pass_ctx
from cli.progress import progress_callback


@click.group()
def project() -> None:
    """Connect a sonoseg project to a Label Studio project."""


@project.command("link")
@click.option("--project", "project_name", required=True, help="sonoseg project (name or id).")
@click.option("--ls-project", "ls_project_id", type=int, required=True, help="Label Studio project id.")
@pass_ctx
def link(c: CliContext, project_name: str, ls_project_id: int) -> None:
    """Link to an existing Label Studio project (its labels must be the project's classes, in order)."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.push import link_project

    try:
        client = _client(c)
        info = client.get_project(ls_project_id)
        with unit_of_work(c.factory) as session:
            linked = link_project(
                session, get_project(session, project_name), ls_project_id, str(info.get("label_config") or "")
            )
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(f"project {linked.project_id} linked to Label Studio project {linked.ls_project_id}")


@project.command("create-ls")
@click.option("--project", "project_name", required=True, help="sonoseg project (name or id).")
@click.option("--title", default=None, help="Label Studio project title (default: the project's name).")
@pass_ctx
def create_ls(c: CliContext, project_name: str, title: str | None) -> None:
    """Create a Label Studio project with a label config built from the class map, and link it."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.push import link_project, new_label_config

    try:
        client = _client(c)
        with unit_of_work(c.factory) as session:
            proj = get_project(session, project_name)
            if proj.ls_project_id is not None:
                raise click.ClickException(
                    f"project {proj.name!r} is already linked to Label Studio project {proj.ls_project_id}"
                )
            name, config = proj.name, new_label_config(proj)
        created = client.create_project(title or name, config)
        with unit_of_work(c.factory) as session:
            linked = link_project(session, get_project(session, project_name), int(created["id"]), config)
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(f"Label Studio project {linked.ls_project_id} created and linked to project {linked.project_id}")


@click.command("push")
@click.option("--project", "project_name", required=True, help="sonoseg project (name or id), already linked.")
@click.option(
    "--split", "splits", multiple=True, type=click.Choice(["train", "val", "test"]), help="Only these splits."
)
@click.option("--only-unlabelled", is_flag=True, help="Only frames without a current label.")
@click.option(
    "--masks-as",
    type=click.Choice(["annotations", "predictions", "none"]),
    default="annotations",
    show_default=True,
    help="How each frame's current mask travels: an annotation to review, a prediction to accept, or not at all.",
)
@click.option("--batch-size", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def push(
    c: CliContext,
    project_name: str,
    splits: tuple[str, ...],
    only_unlabelled: bool,
    masks_as: str,
    batch_size: int,
    as_json: bool,
) -> None:
    """Upload the project's stored (de-identified) frames to Label Studio as tasks; idempotent."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.push import MasksAs, push_project

    try:
        _client(c)
        with unit_of_work(c.factory) as session:
            project_id = get_project(session, project_name).id
        with progress_callback("push", unit="frame") as tick:
            report = push_project(
                c.runtime.mirror,
                project_id,
                splits=splits,
                only_unlabelled=only_unlabelled,
                masks_as=cast("MasksAs", masks_as),  # click.Choice checked it
                batch_size=batch_size,
                on_item=tick,
            )
    except SonosegError as exc:
        raise fail(exc) from exc
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        click.echo(
            f"Label Studio project {report.ls_project_id}: {report.pushed} frame(s) pushed "
            f"({report.annotations} with an annotation, {report.predictions} with a prediction), "
            f"{report.already_pushed} already there, {report.recovered} recovered, {len(report.errors)} failed"
        )
        for error in report.errors:
            click.echo(f"  failed: {error}", err=True)
    if report.errors:
        sys.exit(1)


def _client(c: CliContext) -> LabelStudioClient:
    client = c.runtime.fetcher.client
    if client is None:
        raise click.ClickException("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to talk to Label Studio")
    return client

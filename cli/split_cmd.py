"""``sonoseg split``: the curator's train / val / test decisions (freeze, move, log, show)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

from backend.errors import SonosegError
from cli.context import CliContext, fail, pass_ctx
from cli.import_cmd import SPLITS, os_user

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from backend.db.models import Project

T = TypeVar("T")


@click.group("split")
def split() -> None:
    """Train / val / test: freeze the test split, move a subject, list who changed what."""


def _read(c: CliContext, project_name: str, read: Callable[[Session, Project], T]) -> T:
    """``read(session, project)`` in one unit of work; a :class:`SonosegError` becomes the CLI's error."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project

    try:
        with unit_of_work(c.factory) as session:
            return read(session, get_project(session, project_name))
    except SonosegError as exc:
        raise fail(exc) from exc


@split.command("show")
@click.option("--project", "project_name", required=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def split_show(c: CliContext, project_name: str, as_json: bool) -> None:
    """Images and subjects per split, and whether the test split is frozen."""
    from backend.services.splits import split_summary

    summary = _read(c, project_name, split_summary)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(summary)))
        return
    for name in SPLITS:
        click.echo(f"{name:5s} {summary.images[name]:7d} image(s) {summary.subjects[name]:6d} subject(s)")
    click.echo(f"test split: {'frozen' if summary.test_frozen else 'not frozen'}")


@split.command("freeze")
@click.option("--project", "project_name", required=True)
@click.option("--reason", default=None, help="Why (recorded).")
@click.option("--by", "author", default=None, help="Who is recorded [OS user].")
@pass_ctx
def split_freeze(c: CliContext, project_name: str, reason: str | None, author: str | None) -> None:
    """Freeze the test split: new subjects go to train or val only; moving in or out needs --force."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.splits import freeze_test

    try:
        with unit_of_work(c.factory) as session:
            project = get_project(session, project_name)
            changed = freeze_test(session, project, author=author or os_user(), reason=reason)
            name = project.name
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(f"project {name!r}: test split {'frozen' if changed else 'was already frozen'}")


@split.command("move")
@click.option("--project", "project_name", required=True)
@click.option(
    "--subject",
    default=None,
    help="Subject pseudonym (subj-..., as `sonoseg export` and `split log` show), or the raw identifier "
    "the import used (pseudonymised here, never stored).",
)
@click.option("--image", "image_id", type=int, default=None, help="An image id: its whole subject moves.")
@click.option("--to", "to", required=True, type=click.Choice(SPLITS))
@click.option("--force", is_flag=True, help="Allow moving into or out of a frozen test split.")
@click.option("--reason", default=None, help="Why (recorded).")
@click.option("--by", "author", default=None, help="Who is recorded [OS user].")
@pass_ctx
def split_move(
    c: CliContext,
    project_name: str,
    subject: str | None,
    image_id: int | None,
    to: str,
    force: bool,
    reason: str | None,
    author: str | None,
) -> None:
    """Move every image of a subject to another split (one subject never straddles splits)."""
    from backend.db.session import unit_of_work
    from backend.services.dataset import subject_pseudonym
    from backend.services.projects import get_project
    from backend.services.pseudonyms import load_or_create_key
    from backend.services.splits import move_subject

    if (subject is None) == (image_id is None):
        raise click.UsageError("give exactly one of --subject and --image")
    if subject is not None:  # a raw identifier (a hospital number) finds its pseudonym; it is not stored
        subject = subject_pseudonym(subject.strip(), load_or_create_key(c.settings.data_dir))
    try:
        with unit_of_work(c.factory) as session:
            project = get_project(session, project_name)
            move = move_subject(
                session,
                project,
                to=to,
                author=author or os_user(),
                subject=subject,
                image_id=image_id,
                force=force,
                reason=reason,
            )
    except SonosegError as exc:
        raise fail(exc) from exc
    if not move.moved:
        click.echo(f"subject {move.subject}: already in {move.to_split}; nothing moved")
        return
    moved = ", ".join(f"{n} from {name}" for name, n in move.moved)
    click.echo(f"subject {move.subject}: {move.images} image(s) moved to {move.to_split} ({moved})")
    if move.forced:
        click.echo("  (forced past the frozen test split)")
    if move.froze_test:
        click.echo("  the project's test split is now frozen")


@split.command("log")
@click.option("--project", "project_name", required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_ctx
def split_log_cmd(c: CliContext, project_name: str, as_json: bool) -> None:
    """Every split decision in the project: moves and freezes, with who, when and why."""
    from backend.services.splits import split_log

    records = _read(c, project_name, split_log)
    if not records and not as_json:
        click.echo("no split changes recorded")
    for r in records:
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(r), default=str))
            continue
        when = f"{r.created_at:%Y-%m-%d %H:%M:%S}"
        why = f": {r.reason}" if r.reason else ""
        if r.kind == "freeze":
            click.echo(f"{r.id:5d} {when} freeze test split, by {r.author}{why}")
        else:
            image = f" (asked by image {r.image_id})" if r.image_id is not None else ""
            forced = " FORCED" if r.forced else ""
            click.echo(
                f"{r.id:5d} {when} move subject {r.subject}{image}: {r.images} image(s) {r.from_split} -> "
                f"{r.to_split}{forced}, by {r.author}{why}"
            )

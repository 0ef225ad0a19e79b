"""``sonoseg next``: the images a sonographer should label next, leased to them (active learning).

The ranking and the leases are :mod:`backend.services.worklist`; the same answer is served over HTTP
as ``GET /api/next`` (:mod:`backend.api.worklist_views`). docs/active-learning.md.
"""

from __future__ import annotations

import json

import click

from backend.active_learning.strategies import STRATEGY_NAMES
from backend.errors import SonosegError
from backend.services.worklist import DEFAULT_TTL_SECONDS, MAX_BATCH, MAX_TTL_SECONDS
from cli.context import CliContext, fail, pass_ctx
from cli.import_cmd import os_user


@click.command("next")
@click.option("--project", "project_name", required=True, help="Project name or id.")
@click.option("--annotator", default=None, help="Who the images are leased to [OS user].")
@click.option(
    "-n", "n", type=click.IntRange(1, MAX_BATCH), default=1, show_default=True, help="How many images to hand out."
)
@click.option(
    "--ttl",
    "ttl",
    type=click.FloatRange(1, MAX_TTL_SECONDS),
    default=DEFAULT_TTL_SECONDS,
    show_default=True,
    help="Seconds the images stay leased to the annotator (asking again renews them).",
)
@click.option("--strategy", default=None, help="Rank with this strategy for this call [the project's].")
@click.option(
    "--set-strategy",
    "set_strategy",
    default=None,
    help=f"Make this the project's strategy ({', '.join(STRATEGY_NAMES)}) and lease nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (the body of GET /api/next).")
@pass_ctx
def next_cmd(
    c: CliContext,
    project_name: str,
    annotator: str | None,
    n: int,
    ttl: float,
    strategy: str | None,
    set_strategy: str | None,
    as_json: bool,
) -> None:
    """Lease the next N images of the project's pool (unlabelled training frames) to an annotator,
    ranked by the project's active-learning strategy. Asking again returns your live leases first;
    a submitted annotation ends a lease; an expired one returns the image to the pool."""
    from backend.db.session import unit_of_work
    from backend.services import worklist
    from backend.services.projects import get_project

    try:
        with unit_of_work(c.factory) as session:
            project = get_project(session, project_name)
            if set_strategy is not None:
                name = worklist.set_strategy(session, project, set_strategy)
                click.echo(f"project {project.name!r}: active-learning strategy {name}")
                return
            answer = worklist.hand_out(session, project, annotator or os_user(), n, ttl_seconds=ttl, strategy=strategy)
    except SonosegError as exc:
        raise fail(exc) from exc
    if as_json:
        click.echo(json.dumps(answer.to_json()))
        return
    model = answer.model_version or "no model yet: random order"
    if not answer.leases:
        click.echo(
            f"project {answer.project!r}: nothing to label for {answer.annotator} (every training image is "
            "labelled or leased to someone else)"
        )
        return
    click.echo(
        f"project {answer.project!r} ({answer.strategy}, {model}): {len(answer.leases)} image(s) for {answer.annotator}"
    )
    for lease in answer.leases:
        task = f"task {lease.ls_task_id}" if lease.ls_task_id is not None else "no Label Studio task"
        click.echo(
            f"{lease.rank:3d}. image {lease.image_id} ({task}), leased until {lease.expires_at:%Y-%m-%d %H:%M:%S}Z"
        )

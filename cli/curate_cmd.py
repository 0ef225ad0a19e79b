"""``sonoseg stats`` and ``sonoseg review``: what a curator needs to judge a dataset's labels.

Both read the database in one short unit of work, then read masks (and run the model) outside
it: with SQLite every transaction holds the write lock, and a server may be writing meanwhile.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from backend.errors import SonosegError
from cli.context import CliContext, fail, pass_ctx

if TYPE_CHECKING:
    from backend.services.review import ReviewReport
    from backend.services.stats import DatasetStats


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (stdout stays clean for --json); ``on_item(done, total)``."""
    with click.progressbar(length=max(total, 1), label=label, file=sys.stderr, show_pos=True) as bar:
        shown = 0

        def on_item(done: int, _total: int) -> None:
            nonlocal shown
            bar.update(done - shown)
            shown = done

        yield on_item


@click.command("stats")
@click.option("--project", "project_name", required=True, help="Project name or id.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON object.")
@pass_ctx
def stats(c: CliContext, project_name: str, as_json: bool) -> None:
    """Images and labels per split and subject; per class prevalence, objects and their sizes;
    annotators, label versions, mask sources, conflicting duplicates."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.stats import count_dataset, measure_labels

    try:
        with unit_of_work(c.factory) as session:
            counts = count_dataset(session, get_project(session, project_name))
        with _progress("reading labels", len(counts.labels)) as on_item:
            result = measure_labels(c.store, counts, on_item)
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else stats_text(result))


def stats_text(s: DatasetStats) -> str:
    """A readable report: tables for splits and classes, a line for each other fact."""
    lines = [
        f"project {s.project!r} (id {s.project_id}): {s.images} images, {s.labelled} labelled, "
        f"{len(s.subjects)} subjects; classes {', '.join(s.class_names)}",
        "",
        f"{'split':<8}{'images':>8}{'labelled':>10}",
        *(f"{row.split:<8}{row.images:>8}{row.labelled:>10}" for row in s.splits),
    ]
    if s.subjects:
        per = np.array([row.images for row in s.subjects])
        unlabelled = sum(1 for row in s.subjects if row.labelled == 0)
        lines.append(
            f"subjects: {len(s.subjects)} (images per subject: min {per.min()}, median {np.median(per):g}, "
            f"max {per.max()}; {unlabelled} without a label; --json lists them)"
        )
    lines += [
        "",
        f"{'class':<16}{'images':>8}{'prevalence':>12}{'objects':>9}{'min':>8}{'median':>9}{'p95':>9}{'max':>8}",
    ]
    for cls in s.classes:
        z = cls.sizes
        sizes = f"{z.min:>8}{z.median:>9.1f}{z.p95:>9.1f}{z.max:>8}" if z else f"{'-':>8}{'-':>9}{'-':>9}{'-':>8}"
        lines.append(f"{cls.name:<16}{cls.images:>8}{100 * cls.prevalence:>11.3f}%{cls.objects:>9}{sizes}")
    lines += [
        f"(prevalence: class pixels / {s.labelled_pixels} labelled pixels; objects: {s.connectivity}-connected "
        "components; sizes in pixels)",
        "",
        "annotators (current annotation labels): " + (", ".join(f"{a.name} {a.count}" for a in s.annotators) or "none"),
        "mask versions by source: "
        + ", ".join(f"{v.name} {v.count}" for v in s.versions_by_source)
        + f"; {s.images_with_several_label_versions} image(s) with more than one label version",
        "current labels by source: " + ", ".join(f"{v.name} {v.count}" for v in s.current_by_source),
        f"conflicting duplicates (open issues): {s.conflicting_duplicates} image(s)"
        + (" - `sonoseg masks issues` lists them" if s.conflicting_duplicates else ""),
    ]
    return "\n".join(lines)


@click.command("review")
@click.option("--project", "project_name", required=True, help="Project name or id.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the overlay PNGs [default: <data_dir>/review/<project>/].",
)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="At most N items per kind.")
@click.option("--json", "as_json", is_flag=True, help="Print the queue as one JSON object.")
@pass_ctx
def review(c: CliContext, project_name: str, out_dir: Path | None, limit: int, as_json: bool) -> None:
    """A queue of labels to look at again, worst first: disagreement with the serving model,
    between annotators, conflicting duplicates, object size outliers. Writes one overlay PNG
    (image | label | model) per item."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.review import build_review, default_review_dir, plan_review, write_overlays
    from backend.services.serving import load_from_store

    try:
        with unit_of_work(c.factory) as session:
            plan = plan_review(session, get_project(session, project_name))
        total = len(plan.labelled) + len(plan.raters) + len(plan.conflicts)
        with _progress("scoring labels", total) as on_item:
            report = build_review(plan, c.store, load_from_store(c.store, c.settings), limit=limit, on_item=on_item)
        target = out_dir or default_review_dir(c.settings.data_dir, plan.project)
        with _progress("writing overlays", len(report.items)) as on_item:
            report = write_overlays(c.store, report, target, on_item=on_item)
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else review_text(report, target))


def review_text(r: ReviewReport, out_dir: Path) -> str:
    lines = [f"review of project {r.project!r} (id {r.project_id}), serving model {r.model_uid or 'none'}"]
    lines += [f"  {note}" for note in r.notes]
    lines.append(
        "found: "
        + ", ".join(
            f"{c.kind} {c.candidates}" + (f" (top {c.listed})" if c.listed < c.candidates else "") for c in r.counts
        )
    )
    lines.append(f"size_outlier rule: {r.size_rule}")
    if not r.items:
        lines.append("nothing to review")
        return "\n".join(lines)
    lines += ["", f"{'rank':>4}  {'kind':<22}{'image':>7}{'score':>8}  reason"]
    lines += [f"{i.rank:>4}  {i.kind:<22}{i.image_id:>7}{i.score:>8.3f}  {i.reason}" for i in r.items]
    lines.append(f"\nwrote {len(r.items)} overlay(s) to {out_dir}")
    return "\n".join(lines)

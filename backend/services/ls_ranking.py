"""sonoseg's ranking becomes Label Studio's own label stream (Label Studio 1.23 Community).

Label Studio Community has no priority field and no hook into "which task next", but its Data
Manager tabs (``/api/dm/views``) keep filters and an ordering, and its label stream can take them.
:func:`publish_ranking` writes each task's place in sonoseg's ranking into the task's data
(``sonoseg_rank``, a zero-padded string such as ``"00000001"``, so it sorts the same whether the
database compares it as text, as PostgreSQL does for a JSON value, or as a number), makes sure
the tab :data:`VIEW_TITLE` shows the not-yet-labelled tasks in that order, and sets the project to
Sequential sampling.

What reads the tab (established against Label Studio 1.23.2's code and its web UI; proven by
``tests/test_labelstudio_e2e.py``; docs/labelstudio.md has the settings for curators):

- ``GET /api/projects/<id>/next?view=<tab>`` builds the queue from the tab and, with Sequential
  sampling, hands out its first task not locked by another user and locks it: the next caller
  gets the next task; the same caller asking again gets the task it holds. What sonoseg's own
  tools call.
- The web UI's *Label Tasks As Displayed* (the arrow next to *Label All Tasks*) sends the tab's
  filters and ordering with ``POST /api/dm/actions?id=next_task``: the stream follows the ranking,
  but that path ("Data manager queue") ignores other users' locks, so two annotators in the same
  tab are both handed its first task. *Label All Tasks* sends neither and ignores the tab (task
  id order).

So for a team labelling in the web UI, ``annotators`` deals the ranked tasks out in turn
(1st, 3rd, 5th... to the first annotator, 2nd, 4th... to the second, with two) into task data
``sonoseg_queue``, and makes one tab per annotator (:func:`annotator_view_title`) filtered to
that queue: each annotator labels their own tab *As Displayed*, their share in ranking order, and
no two are handed the same task. A later publish without annotators empties ``sonoseg_queue``
(the old annotator tabs then show nothing); tabs are never deleted.

Idempotent: tasks are listed once, and only those whose rank or queue changes are patched (a
task patch carries its whole data, every other key kept); the tabs and the sampling are written
only when they differ. Ranks are positions (1, 2, 3...) in the stream: the ranked tasks in the
order of their given ranks (ties by task id), then every other not-yet-labelled task, in the order
of its previous rank, then by task id. Labelled tasks outside the ranking are left alone.

A workflow of network calls only (see :mod:`backend.services`): it touches no database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.errors import InvalidInput, UpstreamError
from backend.labelstudio.client import SEQUENTIAL_SAMPLING, LabelStudioClient

log = logging.getLogger(__name__)

RANK_KEY = "sonoseg_rank"
"""Task data key holding the task's place in sonoseg's ranking (zero-padded, see :func:`format_rank`)."""
QUEUE_KEY = "sonoseg_queue"
"""Task data key naming the annotator whose tab holds the task (only when published with annotators)."""
VIEW_TITLE = "sonoseg: next to label"
RANK_DIGITS = 8
RANK_ORDERING = (f"tasks:data.{RANK_KEY}",)
NOT_LABELLED: Mapping[str, Any] = {
    "filter": "filter:tasks:completed_at",  # the Data Manager's "Completed" column: empty until labelled
    "operator": "empty",
    "type": "Datetime",
    "value": True,
}
MAX_ANNOTATOR_CHARS = 254  # an e-mail address at most


def format_rank(position: int) -> str:
    """``7`` -> ``"00000007"``: sorts as text the way the number sorts."""
    if not 1 <= position < 10**RANK_DIGITS:
        raise InvalidInput(f"rank {position} is outside 1..{10**RANK_DIGITS - 1}")
    return f"{position:0{RANK_DIGITS}d}"


def parse_rank(value: Any) -> int | None:
    """The position a task's ``sonoseg_rank`` holds, or None (missing, or not written by sonoseg)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def annotator_view_title(annotator: str) -> str:
    """The tab of one annotator's share (the name first: Data Manager tabs show about 15 characters)."""
    return f"{annotator} (sonoseg)"


def ranks_in_order(ls_task_ids: Iterable[int]) -> list[tuple[int, int]]:
    """``[(task id, rank)]`` for task ids listed best first (rank 1 first)."""
    return [(task_id, rank) for rank, task_id in enumerate(ls_task_ids, start=1)]


@dataclass(frozen=True)
class RankingPublished:
    """What one :func:`publish_ranking` did."""

    ls_project_id: int
    view_id: int  # the tab "sonoseg: next to label"
    tasks_ranked: int  # tasks of the ranking that the project has
    tasks_queued: int  # tasks in the stream: the ranked ones, then the other not-yet-labelled ones
    tasks_updated: int  # tasks whose data was patched
    tasks_unchanged: int
    missing: tuple[int, ...]  # task ids of the ranking that the project does not have
    view_created: bool
    view_updated: bool
    sampling_changed: bool
    annotator_views: Mapping[str, int] = field(default_factory=dict)  # annotator -> their tab's id
    annotator_views_written: int = 0  # annotator tabs created, or set back to their filters and ordering

    @property
    def changed(self) -> bool:
        """Whether anything in Label Studio was written (False when the same ranking is published again)."""
        written = self.tasks_updated + self.annotator_views_written
        return bool(written or self.view_created or self.view_updated or self.sampling_changed)

    def to_json(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["missing"] = list(self.missing)
        out["annotator_views"] = dict(self.annotator_views)
        out["changed"] = self.changed
        return out


@dataclass(frozen=True)
class _Task:
    id: int
    data: dict[str, Any]
    is_labeled: bool


def publish_ranking(
    client: LabelStudioClient,
    ls_project_id: int,
    ranked: Sequence[tuple[int, int]],
    *,
    annotators: Sequence[str] = (),
) -> RankingPublished:
    """Make Label Studio project ``ls_project_id``'s label stream follow ``ranked``.

    ``ranked`` holds ``(Label Studio task id, rank)`` pairs, rank 1 best; ranks need not be
    consecutive. With ``annotators`` (distinct names, e.g. their Label Studio e-mail addresses),
    the stream is dealt out among them, one tab each (see the module docstring). Raises
    :class:`InvalidInput` for a task listed twice or a bad annotator list, and
    :class:`UpstreamError` when Label Studio fails; a failed run can simply be repeated.
    """
    project = int(ls_project_id)
    if project <= 0:
        raise InvalidInput(f"not a Label Studio project id: {ls_project_id!r}")
    pairs = _checked_ranking(ranked)
    people = _checked_annotators(annotators)
    tasks = [_task(raw) for raw in client.iter_tasks(project, fields="task_only")]
    by_id = {t.id: t for t in tasks}
    missing = tuple(task_id for task_id, _ in pairs if task_id not in by_id)
    if missing:
        log.warning(
            "publish_ranking: %d ranked task(s) are not in Label Studio project %d (deleted?), e.g. %s",
            len(missing),
            project,
            list(missing[:5]),
        )
    stream = _stream(tasks, [(t, r) for t, r in pairs if t in by_id])
    if len(stream) >= 10**RANK_DIGITS:
        raise InvalidInput(f"{len(stream)} tasks to rank: over the {10**RANK_DIGITS - 1} a rank can hold")

    updated = unchanged = 0
    turn = 0
    for position, task in enumerate(stream, start=1):
        changes: dict[str, Any] = {}
        rank = format_rank(position)
        if task.data.get(RANK_KEY) != rank:
            changes[RANK_KEY] = rank
        if people and not task.is_labeled:
            queue = people[turn % len(people)]
            turn += 1
            if task.data.get(QUEUE_KEY) != queue:
                changes[QUEUE_KEY] = queue
        elif not people and task.data.get(QUEUE_KEY):
            # Dealt out by an earlier publish, not by this one: in no annotator's tab any more. Emptied,
            # not removed: the web UI silently drops a tab's filter on a data key no task has, and an
            # old annotator tab would then show every task.
            changes[QUEUE_KEY] = ""
        if not changes:
            unchanged += 1
            continue
        client.update_task_data(task.id, changes, current=task.data)
        updated += 1

    shared = client.ensure_view(project, VIEW_TITLE, filters=_filters(), ordering=RANK_ORDERING)
    views: dict[str, int] = {}
    views_written = 0
    for person in people:
        own = client.ensure_view(
            project, annotator_view_title(person), filters=_filters(person), ordering=RANK_ORDERING
        )
        views[person] = own.view.id
        views_written += own.created or own.updated
    sampling_changed = client.set_sampling(project, SEQUENTIAL_SAMPLING)

    result = RankingPublished(
        ls_project_id=project,
        view_id=shared.view.id,
        tasks_ranked=len(pairs) - len(missing),
        tasks_queued=len(stream),
        tasks_updated=updated,
        tasks_unchanged=unchanged,
        missing=missing,
        view_created=shared.created,
        view_updated=shared.updated,
        sampling_changed=sampling_changed,
        annotator_views=views,
        annotator_views_written=views_written,
    )
    log.info(
        "published a ranking of %d task(s) to Label Studio project %d: %d task(s) updated, tab %d%s",
        result.tasks_ranked,
        project,
        updated,
        result.view_id,
        f", {len(views)} annotator tab(s)" if views else "",
    )
    return result


def _filters(annotator: str | None = None) -> dict[str, Any]:
    items: list[Mapping[str, Any]] = [NOT_LABELLED]
    if annotator is not None:
        items.append(
            {"filter": f"filter:tasks:data.{QUEUE_KEY}", "operator": "equal", "type": "String", "value": annotator}
        )
    return {"conjunction": "and", "items": [dict(i) for i in items]}


def _stream(tasks: Sequence[_Task], pairs: Sequence[tuple[int, int]]) -> list[_Task]:
    """The ranked tasks by rank (ties by id), then the other not-yet-labelled tasks by previous rank, then id."""
    by_id = {t.id: t for t in tasks}
    head = [by_id[task_id] for task_id, _ in sorted(pairs, key=lambda p: (p[1], p[0]))]
    in_head = {t.id for t in head}
    never = 10**RANK_DIGITS  # unranked before: after every previously ranked task
    tail = sorted(
        (t for t in tasks if t.id not in in_head and not t.is_labeled),
        key=lambda t: (parse_rank(t.data.get(RANK_KEY)) or never, t.id),
    )
    return head + tail


def _checked_ranking(ranked: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for item in ranked:
        try:
            task_id, rank = item
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"a ranking entry must be (task id, rank), got {item!r}") from exc
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (task_id, rank)) or task_id <= 0:
            raise InvalidInput(f"a ranking entry must be (task id, rank) integers, got {item!r}")
        if task_id in seen:
            raise InvalidInput(f"task {task_id} is ranked twice")
        seen.add(task_id)
        pairs.append((task_id, rank))
    return pairs


def _checked_annotators(annotators: Sequence[str]) -> list[str]:
    if isinstance(annotators, str):
        raise InvalidInput("annotators must be a list of names, not one string")
    people = [str(a).strip() for a in annotators]
    for person in people:
        if not person or len(person) > MAX_ANNOTATOR_CHARS:
            raise InvalidInput(f"an annotator needs a name of 1 to {MAX_ANNOTATOR_CHARS} characters, got {person!r}")
    if len(set(people)) != len(people):
        raise InvalidInput(f"an annotator is listed twice: {people}")
    return people


def _task(raw: Mapping[str, Any]) -> _Task:
    task_id, data = raw.get("id"), raw.get("data")
    if not isinstance(task_id, int) or not isinstance(data, dict):
        raise UpstreamError("Label Studio listed a task without an id or a data object")
    return _Task(task_id, dict(data), bool(raw.get("is_labeled")))


__all__ = [
    "MAX_ANNOTATOR_CHARS",
    "NOT_LABELLED",
    "QUEUE_KEY",
    "RANK_DIGITS",
    "RANK_KEY",
    "RANK_ORDERING",
    "VIEW_TITLE",
    "RankingPublished",
    "annotator_view_title",
    "format_rank",
    "parse_rank",
    "publish_ranking",
    "ranks_in_order",
]

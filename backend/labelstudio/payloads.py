"""What Label Studio sends, parsed once into typed values that every path uses.

A task reaches sonoseg three ways: in a ``/predict`` body, inside a webhook, and from the API
during reconciliation. Each used to read the raw JSON its own way (a ``subject`` was accepted as
a string on two paths and also as an integer on the third, so a patient's frames could land in
different splits). Now all three call :meth:`LsTask.parse` and :meth:`LsAnnotation.parse`.

The parsers are also the first line of defence against hostile bodies; they refuse, with a
message, before anything is stored:

- ids that are not positive integers that fit the signed 32-bit id columns (larger ones raised
  ``OverflowError`` deep inside the database driver, after the event was stored);
- annotation results that could only be an attack or a bug: more than :data:`MAX_REGIONS`
  regions, or a brush RLE longer than any encoder could write for the region's declared size
  (an RLE of 15 million integers was stored as 45 MB of JSON before failing);
- timestamps that are not ISO 8601.

Nothing here talks to the database or the network.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from backend.errors import InvalidInput

MAX_ID = 2**31 - 1
"""Label Studio's ids are positive Django ``AutoField`` integers (32-bit), and so are the id
columns sonoseg stores them in; a larger value can only be a forgery."""

MAX_REGIONS = 1000
"""Regions per annotation. A frame holds a handful of nerves and vessels; thousands is an attack."""

MAX_SIDE = 65535
"""Largest ``original_width``/``original_height`` a region may declare (the image's own limit,
SONOSEG_MAX_IMAGE_SIDE, is enforced where the image is decoded)."""

RLE_HEADER_BYTES = 7
MAX_RLE_BITS_PER_WORD = 1 + 2 + 16 + 8
"""Worst case of the rle-pack stream per 8-bit word: a chunk header (flag, size index, a 16-bit
count) for every single literal word. Any valid stream for ``n`` words fits in
``RLE_HEADER_BYTES + ceil(n * MAX_RLE_BITS_PER_WORD / 8)`` bytes."""

MAX_TEXT = 10_000
"""Longest string kept from a free-text field (a subject id, a timestamp)."""


def ls_id(value: object, what: str) -> int:
    """A Label Studio id: a positive integer up to 2**31-1 (booleans and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer id, got {type(value).__name__}")
    if not 0 < value <= MAX_ID:
        shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:20]}... ({len(str(value))} digits)"
        raise InvalidInput(f"{what} must be between 1 and {MAX_ID}, got {shown}")
    return value


def optional_ls_id(value: object, what: str) -> int | None:
    return None if value is None else ls_id(value, what)


def ls_project_id_of(value: object) -> int:
    """Label Studio's project reference -> its id: ``"12.1700000000"`` (/setup, /predict), 12, or ``{"id": 12}``."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()
        if head.isascii() and head.isdigit() and len(head) <= 12:
            return ls_id(int(head), "project")
        raise InvalidInput(f"cannot read a Label Studio project id from {value[:40]!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        return ls_id(value, "project")
    raise InvalidInput(f"cannot read a Label Studio project id from {str(value)[:40]!r}")


def parse_timestamp(value: object, what: str) -> dt.datetime | None:
    """Label Studio's ISO 8601 timestamps (``2026-11-30T10:00:00.123456Z``), as aware UTC datetimes."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidInput(f"{what} must be an ISO 8601 timestamp string")
    try:
        stamp = dt.datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise InvalidInput(f"{what} is not an ISO 8601 timestamp: {value[:40]!r}") from exc
    if stamp.tzinfo is None:  # Label Studio writes UTC; a naive stamp is read as UTC
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.astimezone(dt.UTC)


@dataclass(frozen=True)
class LsTask:
    """A Label Studio task as sonoseg uses it.

    ``subject``: the task data's ``subject`` field, a string or an integer (read the same on every
    path), as text; None when absent. ``data`` is read-only.
    """

    id: int | None
    data: Mapping[str, Any]
    subject: str | None

    @classmethod
    def parse(cls, raw: object, *, require_id: bool = False) -> LsTask:
        if not isinstance(raw, Mapping):
            raise InvalidInput("a task must be a JSON object")
        task_id = raw.get("id")
        parsed_id = None if task_id is None and not require_id else ls_id(task_id, "task id")
        data = raw.get("data")
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidInput(f"task {parsed_id}: 'data' must be an object")
        return cls(parsed_id, MappingProxyType(dict(data)), _subject(data.get("subject"), parsed_id))

    def require_id(self) -> int:
        if self.id is None:
            raise InvalidInput("the task has no id")
        return self.id

    @property
    def sonoseg_image_id(self) -> int | None:
        """The stored image a task made by ``sonoseg push`` shows (its data's ``sonoseg_image_id``)."""
        value = self.data.get("sonoseg_image_id")
        if value is None:
            return None
        return ls_id(value, f"task {self.id}: sonoseg_image_id")

    def image_url(self, value_key: str) -> str:
        """The image URL under the label config's ``$key``."""
        url = self.data.get(value_key)
        if not isinstance(url, str) or not url.strip():
            raise InvalidInput(f"task {self.id}: its data has no image under {value_key!r}")
        return url


def _subject(value: object, task_id: int | None) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"task {task_id}: 'subject' must be a string or an integer, not a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise InvalidInput(f"task {task_id}: 'subject' is longer than {MAX_TEXT} characters")
        return value.strip() or None
    raise InvalidInput(f"task {task_id}: 'subject' must be a string or an integer, got {type(value).__name__}")


@dataclass(frozen=True)
class LsAnnotation:
    """One Label Studio annotation (one version of it: Label Studio updates annotations in place).

    ``updated_at`` is Label Studio's own clock for this content: labels are ordered by it, not by
    when a delivery arrived. ``completed_by`` is the user id only (never the e-mail address).
    """

    id: int
    task_id: int | None
    results: tuple[Mapping[str, Any], ...]
    was_cancelled: bool
    updated_at: dt.datetime | None
    completed_by: int | None
    lead_time: float | None

    @classmethod
    def parse(cls, raw: object, *, task_id: int | None = None) -> LsAnnotation:
        """``task_id``: the enclosing task's id, used when the annotation does not name its own."""
        if not isinstance(raw, Mapping):
            raise InvalidInput("an annotation must be a JSON object")
        ann_id = ls_id(raw.get("id"), "an annotation's integer 'id'")
        own_task = raw.get("task")
        if isinstance(own_task, Mapping):
            own_task = own_task.get("id")
        parsed_task = optional_ls_id(own_task, f"annotation {ann_id}: task id")
        if parsed_task is None:
            parsed_task = task_id
        results = raw.get("result")
        if results is None:
            results = []
        if not isinstance(results, list):
            raise InvalidInput(f"annotation {ann_id}: 'result' must be a list")
        check_results(results, f"annotation {ann_id}")
        cancelled = raw.get("was_cancelled", False)
        if not isinstance(cancelled, bool) and cancelled is not None:
            raise InvalidInput(f"annotation {ann_id}: 'was_cancelled' must be true or false")
        return cls(
            id=ann_id,
            task_id=parsed_task,
            results=tuple(results),
            was_cancelled=bool(cancelled),
            updated_at=parse_timestamp(
                raw.get("updated_at") or raw.get("created_at"), f"annotation {ann_id} updated_at"
            ),
            completed_by=_user_id(raw.get("completed_by")),
            lead_time=_lead_time(raw.get("lead_time"), ann_id),
        )

    def require_task(self) -> int:
        if self.task_id is None:
            raise InvalidInput(f"the webhook names no task id for annotation {self.id}")
        return self.task_id


def _user_id(value: object) -> int | None:
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID:
        return value
    return None  # an author reference is informative, never a reason to refuse a label


def _lead_time(value: object, ann_id: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"annotation {ann_id}: 'lead_time' must be a number of seconds")
    seconds = float(value)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def check_results(results: Sequence[object], where: str) -> None:
    """Bound an annotation's results before anything stores or decodes them (see module doc)."""
    if len(results) > MAX_REGIONS:
        raise InvalidInput(f"{where} has {len(results)} regions; at most {MAX_REGIONS} are accepted")
    for position, result in enumerate(results):
        if not isinstance(result, Mapping):
            raise InvalidInput(f"{where}: result #{position} is not an object")
        value = result.get("value")
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise InvalidInput(f"{where}: result #{position} has a 'value' that is not an object")
        rle = value.get("rle")
        if rle is None:
            continue
        if not isinstance(rle, list):
            raise InvalidInput(f"{where}: result #{position}: 'rle' must be a list of byte values")
        width = _side(result.get("original_width"), f"{where}: result #{position} original_width")
        height = _side(result.get("original_height"), f"{where}: result #{position} original_height")
        limit = max_rle_length(width, height)
        if len(rle) > limit:
            raise InvalidInput(
                f"{where}: result #{position}: an RLE of {len(rle)} values is longer than any brush stream for a "
                f"{width}x{height} region can be ({limit})"
            )


def max_rle_length(width: int, height: int) -> int:
    """The longest valid brush RLE (in bytes) for a region of ``width`` x ``height`` RGBA pixels."""
    words = 4 * width * height
    return RLE_HEADER_BYTES + math.ceil(words * MAX_RLE_BITS_PER_WORD / 8)


def _side(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE:
        raise InvalidInput(f"{what} must be an integer between 1 and {MAX_SIDE}")
    return value


# -- webhooks ---------------------------------------------------------------------------------------
ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
DELETE_ACTIONS = frozenset({"ANNOTATIONS_DELETED", "TASKS_DELETED"})
HANDLED_ACTIONS = ANNOTATION_ACTIONS | DELETE_ACTIONS | {"START_TRAINING"}


@dataclass(frozen=True)
class WebhookPayload:
    """A webhook body sonoseg acts on, checked whole before it is stored.

    ``annotations`` for the annotation actions (each with its task id), ``tasks`` the task objects
    the body carried (by id; bulk events may carry none), ``deleted_ids`` for the delete actions.
    """

    action: str
    ls_project_id: int
    label_config: str | None
    project_title: str | None
    annotations: tuple[LsAnnotation, ...] = ()
    tasks: Mapping[int, LsTask] = field(default_factory=lambda: MappingProxyType({}))
    deleted_ids: tuple[int, ...] = ()


def webhook_action(body: Mapping[str, Any]) -> str:
    action = body.get("action")
    if not isinstance(action, str) or not action or len(action) > 64:
        raise InvalidInput("a webhook body needs an 'action' string")
    return action


def parse_webhook(body: Mapping[str, Any]) -> WebhookPayload:
    """The typed payload of a handled action (see :data:`HANDLED_ACTIONS`); raises InvalidInput."""
    action = webhook_action(body)
    if action not in HANDLED_ACTIONS:
        raise InvalidInput(f"webhook action {action!r} is not one sonoseg handles")
    project = body.get("project")
    ls_project = ls_project_id_of(project)
    config = project.get("label_config") if isinstance(project, Mapping) else None
    title = project.get("title") if isinstance(project, Mapping) else None
    base = {
        "action": action,
        "ls_project_id": ls_project,
        "label_config": config if isinstance(config, str) else None,
        "project_title": title[:200] if isinstance(title, str) else None,
    }
    if action in DELETE_ACTIONS:
        key = "annotations" if action == "ANNOTATIONS_DELETED" else "tasks"
        items = body.get(key)
        message = f"{action} needs '{key}': a list of {{\"id\": int}}"
        if not isinstance(items, list):
            raise InvalidInput(message)
        try:
            ids = tuple(ls_id(item.get("id") if isinstance(item, Mapping) else None, "id") for item in items)
        except InvalidInput as exc:
            raise InvalidInput(f"{message}: {exc.message}") from exc
        return WebhookPayload(**base, deleted_ids=ids)  # type: ignore[arg-type]
    if action == "START_TRAINING":
        return WebhookPayload(**base)  # type: ignore[arg-type]
    raw_tasks = body.get("task")
    if action == "ANNOTATIONS_CREATED":
        raw_annotations = body.get("annotation")
        if not isinstance(raw_annotations, list):
            raise InvalidInput("ANNOTATIONS_CREATED needs an 'annotation' list")
        if raw_tasks is not None and not isinstance(raw_tasks, list):
            raise InvalidInput("ANNOTATIONS_CREATED: 'task' must be a list")
        if len(raw_annotations) > MAX_REGIONS:
            raise InvalidInput(f"ANNOTATIONS_CREATED carries {len(raw_annotations)} annotations; at most {MAX_REGIONS}")
        tasks = [LsTask.parse(t, require_id=True) for t in raw_tasks or []]
        annotations = tuple(LsAnnotation.parse(a) for a in raw_annotations)
    else:
        if not isinstance(body.get("annotation"), Mapping):
            raise InvalidInput("the webhook has no 'annotation' object")
        if raw_tasks is not None and not isinstance(raw_tasks, Mapping):
            raise InvalidInput("the webhook's 'task' must be an object")
        tasks = [LsTask.parse(raw_tasks, require_id=True)] if raw_tasks is not None else []
        annotations = (LsAnnotation.parse(body["annotation"], task_id=tasks[0].id if tasks else None),)
    for ann in annotations:
        ann.require_task()
    by_id = {t.id: t for t in tasks if t.id is not None}
    return WebhookPayload(**base, annotations=annotations, tasks=MappingProxyType(by_id))  # type: ignore[arg-type]


_ANNOTATION_KEEP = ("id", "task", "result", "was_cancelled", "updated_at", "created_at", "lead_time", "ground_truth")
_TASK_KEEP = ("id", "data", "project")
_PROJECT_KEEP = ("id", "label_config", "title")


def scrub_webhook(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a handled webhook body that is stored: an allow-list of the fields sonoseg
    reads. Users' e-mail addresses, names and every other field Label Studio adds are dropped;
    ``completed_by`` is reduced to the user id. See docs/privacy.md."""
    out: dict[str, Any] = {"action": body.get("action")}
    project = body.get("project")
    out["project"] = _pick(project, _PROJECT_KEEP) if isinstance(project, Mapping) else project
    for key in ("annotation", "task"):
        if key not in body:
            continue
        value = body[key]
        keep = _ANNOTATION_KEEP if key == "annotation" else _TASK_KEEP
        if isinstance(value, list):
            out[key] = [_scrub_item(v, keep) for v in value]
        else:
            out[key] = _scrub_item(value, keep)
    for key in ("annotations", "tasks"):
        if isinstance(body.get(key), list):
            out[key] = [{"id": item.get("id")} if isinstance(item, Mapping) else item for item in body[key]]
    return out


def _scrub_item(value: object, keep: tuple[str, ...]) -> object:
    if not isinstance(value, Mapping):
        return value
    item = _pick(value, keep)
    if "completed_by" in value:
        item["completed_by"] = _user_id(value.get("completed_by"))
    if isinstance(item.get("task"), Mapping):
        item["task"] = item["task"].get("id")
    if isinstance(item.get("project"), Mapping):
        item["project"] = item["project"].get("id")
    return item


def _pick(value: Mapping[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
    return {k: value[k] for k in keep if k in value}

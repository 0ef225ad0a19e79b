"""A small Label Studio API client: the calls sonoseg makes, with both kinds of API key.

Label Studio 1.23 accepts two kinds of key:

- a legacy token (40 hex characters), sent as ``Authorization: Token <key>``; new organisations
  have legacy tokens disabled by default;
- a personal access token (PAT), which is a JWT *refresh* token: it is exchanged at
  ``POST /api/token/refresh/`` for a short-lived access token sent as ``Bearer``. When Label
  Studio answers 401 the access token is refreshed and the request retried once.

The key is only ever sent to the Label Studio origin (scheme, host and port of
``LABEL_STUDIO_URL``): every URL goes through :func:`backend.labelstudio.urls.check_url`, which
reads it as the HTTP client does (or refuses it), and only the URL it rebuilt is sent;
:meth:`LabelStudioClient.request` refuses any other origin, and redirects are followed by hand,
each hop re-checked, so that a hop to another host (a presigned cloud URL) goes without
credentials. Neither the key nor an access token is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import requests

from backend.errors import InvalidInput, NotReady, PayloadTooLarge, UpstreamError
from backend.labelstudio.urls import (  # Origin and redact_url: re-exported, they used to live here
    CheckedUrl,
    Origin,
    check_redirect,
    check_url,
    redact_url,
)
from backend.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = (3.05, 30.0)  # (connect, read) seconds
MAX_REDIRECTS = 5
_CHUNK = 256 * 1024
_HAS_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# requests prepares the next hop of a redirect even with allow_redirects=False (for ``resp.next``),
# and urllib raises ValueError on some Location values (a bad port, a stray '['). Such a hop would
# be refused by the URL policy anyway; it must fail as this one task's reason, not as a crash.
_UNPARSEABLE_REDIRECT = "{} answered a redirect whose Location cannot be parsed; refused"

Sampling = Literal["Sequential sampling", "Uniform sampling", "Uncertainty sampling"]
"""``Project.sampling`` values of Label Studio 1.23."""
SEQUENTIAL_SAMPLING: Sampling = "Sequential sampling"
"""The label stream takes the first task of its queue that no other user holds a lock on."""


class TokenKind(Enum):
    LEGACY = "legacy"
    PERSONAL = "personal"


def token_kind(api_key: str) -> TokenKind:
    """A PAT is a JWT (three base64url parts whose header names an ``alg``); anything else is legacy."""
    parts = api_key.split(".")
    if len(parts) == 3 and all(parts):
        try:
            header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return TokenKind.LEGACY
        if isinstance(header, dict) and "alg" in header:
            return TokenKind.PERSONAL
    return TokenKind.LEGACY


@dataclass(frozen=True)
class DataManagerView:
    """A Data Manager tab (``/api/dm/views``): its filters and ordering choose and sort a task queue."""

    id: int
    project: int
    title: str
    filters: dict[str, Any] | None  # {"conjunction": "and", "items": [{"filter", "operator", "type", "value"}]}
    ordering: tuple[str, ...]  # e.g. ("tasks:data.sonoseg_rank",); "-" in front sorts descending
    data: dict[str, Any]  # the whole ``data`` object as Label Studio keeps it (the UI adds hiddenColumns...)

    @classmethod
    def from_api(cls, body: Any) -> DataManagerView:
        if not isinstance(body, dict) or not isinstance(body.get("id"), int):
            raise UpstreamError("Label Studio returned a Data Manager view without an id")
        raw = body.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        filters = data.get("filters")
        ordering = data.get("ordering")
        return cls(
            id=int(body["id"]),
            project=int(body["project"]) if isinstance(body.get("project"), int) else 0,
            title=str(data.get("title", "")),
            filters=filters if isinstance(filters, dict) else None,
            ordering=tuple(str(o) for o in ordering) if isinstance(ordering, list) else (),
            data=dict(data),
        )


@dataclass(frozen=True)
class EnsuredView:
    """What :meth:`LabelStudioClient.ensure_view` found or made."""

    view: DataManagerView
    created: bool
    updated: bool


def same_filters(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two Data Manager filter groups select the same tasks.

    Compares the conjunction and each item's column, operator, value and child filter, in order;
    not ``type`` (the UI rewrites a ``data.*`` column's type to that column's, e.g. ``Unknown``). No
    items at all is the same as no filter group.
    """

    def item_key(item: Mapping[str, Any]) -> tuple[str, ...]:
        child = item.get("child_filter")
        child_key = item_key(child) if isinstance(child, Mapping) else ()
        value = json.dumps(item.get("value"), sort_keys=True)
        return (str(item.get("filter")), str(item.get("operator")), value, *child_key)

    def key(group: Mapping[str, Any] | None) -> tuple[str, tuple[tuple[str, ...], ...]]:
        items = group.get("items") if group is not None else None
        if group is None or not isinstance(items, list) or not items:
            return ("", ())
        conjunction = str(group.get("conjunction") or "and")
        return (conjunction, tuple(item_key(i) for i in items if isinstance(i, Mapping)))

    return key(a) == key(b)


class LabelStudioClient:
    """Talks to one Label Studio server with one API key. Thread-safe (one access token, locked)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        http: requests.Session | None = None,
    ) -> None:
        if not base_url:
            raise NotReady("LABEL_STUDIO_URL is not set: sonoseg cannot reach Label Studio")
        if not api_key:
            raise NotReady("LABEL_STUDIO_API_KEY is not set: Label Studio will refuse sonoseg's requests")
        self.base_url = base_url.rstrip("/")
        self.origin = check_url(self.base_url).origin
        key = api_key.strip()
        for prefix in ("Token ", "Bearer "):  # tolerate a pasted header value
            if key.startswith(prefix):
                key = key[len(prefix) :].strip()
        self._key = key
        self.kind = token_kind(key)
        self._timeout = timeout
        self._http = http or requests.Session()
        self._access: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> LabelStudioClient:
        return cls(settings.label_studio_url, settings.label_studio_api_key)

    def __repr__(self) -> str:  # never show the key
        return f"LabelStudioClient({self.base_url!r}, {self.kind.value} token)"

    # -- URLs --------------------------------------------------------------------------------
    def absolute(self, path_or_url: str) -> str:
        """``/data/upload/...`` -> ``<LABEL_STUDIO_URL>/data/upload/...``; absolute URLs unchanged."""
        if _HAS_SCHEME.match(path_or_url):  # not urlsplit: it drops tabs and raises on a stray '['
            return path_or_url
        if not path_or_url.startswith("/"):
            raise InvalidInput(f"expected an absolute path on Label Studio, got {redact_url(path_or_url)!r}")
        return self.base_url + path_or_url

    def check(self, path_or_url: str) -> CheckedUrl:
        """``path_or_url`` made absolute and checked by the URL policy (raises InvalidInput if refused)."""
        return check_url(self.absolute(path_or_url))

    def is_label_studio_url(self, url: str | CheckedUrl) -> bool:
        """Whether credentials may go to ``url``: the policy accepts it and its origin is Label Studio's."""
        if isinstance(url, CheckedUrl):
            return url.origin == self.origin
        try:
            return self.check(url).origin == self.origin
        except InvalidInput:
            return False

    # -- auth ----------------------------------------------------------------------------------
    def _auth_header(self) -> str:
        if self.kind is TokenKind.LEGACY:
            return f"Token {self._key}"
        with self._lock:
            if self._access is None:
                self._access = self._refresh_access()
            return f"Bearer {self._access}"

    def _refresh_access(self) -> str:
        url = self._own(self.check("/api/token/refresh/")).url  # the key is in the body: same rule
        try:
            resp = self._http.post(url, json={"refresh": self._key}, timeout=self._timeout, allow_redirects=False)
        except (requests.RequestException, ValueError) as exc:  # ValueError: see _UNPARSEABLE_REDIRECT
            raise UpstreamError(f"cannot reach Label Studio at {self.base_url}: {type(exc).__name__}") from exc
        if resp.status_code in (400, 401, 403):
            raise UpstreamError(
                f"Label Studio refused the personal access token ({resp.status_code}): check LABEL_STUDIO_API_KEY "
                "(it may be revoked or expired; create a new one under Account & Settings)"
            )
        access = _json_body(resp, "token refresh").get("access") if resp.ok else None
        if not isinstance(access, str) or not access:
            raise UpstreamError(f"Label Studio token refresh failed with status {resp.status_code}")
        log.info("obtained a Label Studio access token from the personal access token")
        return access

    def _invalidate(self, header: str) -> None:
        with self._lock:
            if self._access is not None and header == f"Bearer {self._access}":
                self._access = None

    # -- requests ------------------------------------------------------------------------------
    def _own(self, checked: CheckedUrl) -> CheckedUrl:
        """``checked`` if it is on the Label Studio origin; InvalidInput otherwise (credentials stay home)."""
        if checked.origin != self.origin:
            raise InvalidInput(
                f"refusing to send Label Studio credentials to {checked.redacted}: it is not on the Label Studio "
                f"origin {self.origin}"
            )
        return checked

    def request(
        self,
        method: str,
        path_or_url: str | CheckedUrl,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        stream: bool = False,
        files: Sequence[tuple[str, tuple[str, bytes, str]]] | None = None,
    ) -> requests.Response:
        """One request to Label Studio with credentials; 401 with a PAT refreshes and retries once.

        Only URLs that the URL policy accepts *and* that are on the Label Studio origin are
        accepted; what is sent is the policy's rebuilt URL. Redirects are not followed here (see
        :meth:`download`). Connection failures become :class:`UpstreamError`; HTTP error statuses
        are returned.
        """
        checked = path_or_url if isinstance(path_or_url, CheckedUrl) else self.check(path_or_url)
        url = self._own(checked).url
        header = self._auth_header()
        resp = self._send(method, url, header, params=params, json_body=json_body, stream=stream, files=files)
        if resp.status_code == 401 and self.kind is TokenKind.PERSONAL:
            resp.close()
            log.info("Label Studio answered 401; refreshing the access token and retrying once")
            self._invalidate(header)
            header = self._auth_header()
            resp = self._send(method, url, header, params=params, json_body=json_body, stream=stream, files=files)
        if resp.status_code == 401:
            resp.close()
            hint = (
                "legacy tokens are disabled for new organisations in Label Studio 1.23: use a personal access "
                "token, or enable legacy tokens in Organization > API Tokens Settings"
                if self.kind is TokenKind.LEGACY
                else "the personal access token may be revoked"
            )
            raise UpstreamError(f"Label Studio refused the API key (401) for {redact_url(url)}: {hint}")
        return resp

    def _send(
        self,
        method: str,
        url: str,
        header: str,
        *,
        params: dict[str, Any] | None,
        json_body: Any,
        stream: bool,
        files: Sequence[tuple[str, tuple[str, bytes, str]]] | None = None,
    ) -> requests.Response:
        try:
            return self._http.request(
                method,
                url,
                params=params,
                json=json_body,
                files=list(files) if files is not None else None,
                headers={"Authorization": header},
                timeout=self._timeout,
                stream=stream,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise UpstreamError(f"cannot reach Label Studio at {redact_url(url)}: {type(exc).__name__}") from exc
        except ValueError as exc:
            raise UpstreamError(_UNPARSEABLE_REDIRECT.format(redact_url(url))) from exc

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        resp = self.request("GET", path, params=params)
        if not resp.ok:
            raise UpstreamError(f"Label Studio answered {resp.status_code} for GET {redact_url(self.absolute(path))}")
        return _json_body(resp, redact_url(self.absolute(path)))

    def download(self, path_or_url: str | CheckedUrl, *, max_bytes: int, foreign_allowed: bool = True) -> bytes:
        """Bytes of a Label Studio file URL, following redirects by hand.

        Every hop is re-checked by the URL policy (:func:`check_redirect`). Hops on the Label Studio
        origin carry credentials until the first hop elsewhere (Label Studio's presign endpoint
        redirects to a presigned cloud URL); that hop and every hop after it go without them, even
        one back to Label Studio, so a foreign host cannot make us send an authenticated request.
        ``foreign_allowed=False`` refuses such hops. Stops reading past ``max_bytes``.
        """
        first = path_or_url if isinstance(path_or_url, CheckedUrl) else self.check(path_or_url)
        checked = self._own(first)
        resp = self.request("GET", checked, stream=True)
        left_home = False
        for _ in range(MAX_REDIRECTS):
            if not resp.is_redirect:
                break
            location = resp.headers.get("Location", "")
            resp.close()
            checked = check_redirect(checked, location)
            if not left_home and checked.origin == self.origin:
                resp = self.request("GET", checked, stream=True)
                continue
            if not foreign_allowed:
                raise InvalidInput(
                    f"Label Studio redirected to another host ({checked.redacted}), which is not allowed"
                )
            left_home = True
            resp = fetch_without_credentials(self._http, checked, timeout=self._timeout)
        else:
            resp.close()
            raise UpstreamError(f"too many redirects fetching {first.redacted}")
        return read_limited(resp, max_bytes, checked.redacted)

    # -- API calls -------------------------------------------------------------------------------
    def get_project(self, project_id: int) -> dict[str, Any]:
        body = self.get_json(f"/api/projects/{int(project_id)}/")
        if not isinstance(body, dict):
            raise UpstreamError(f"Label Studio returned no project object for project {project_id}")
        return body

    def create_project(self, title: str, label_config: str) -> dict[str, Any]:
        """A new Label Studio project with this label config (``sonoseg project create-ls``)."""
        body = self._post_json("/api/projects/", {"title": title[:50], "label_config": label_config}, "project")
        if not isinstance(body, dict) or not isinstance(body.get("id"), int):
            raise UpstreamError("Label Studio created no project (its answer has no id)")
        return body

    def upload_files(self, project_id: int, files: Sequence[tuple[str, bytes]]) -> list[int]:
        """Upload image files without creating tasks; their ``file_upload_ids``, in order."""
        resp = self.request(
            "POST",
            f"/api/projects/{int(project_id)}/import",
            params={"commit_to_project": "false"},
            files=[(f"file{i}", (name, data, "image/png")) for i, (name, data) in enumerate(files)],
        )
        body = _checked_json(resp, f"uploading {len(files)} file(s) to project {project_id}")
        ids = body.get("file_upload_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or len(ids) != len(files) or not all(isinstance(i, int) for i in ids):
            raise UpstreamError(f"Label Studio acknowledged {ids!r} uploads for {len(files)} file(s)")
        return [int(i) for i in ids]

    def uploaded_paths(self, project_id: int, file_upload_ids: Sequence[int]) -> dict[int, str]:
        """``{file_upload_id: stored name}`` (``upload/<project>/<prefix>-<name>``) of uploaded files."""
        body = self.get_json(
            f"/api/projects/{int(project_id)}/file-uploads",
            params={"ids": json.dumps([int(i) for i in file_upload_ids])},
        )
        if not isinstance(body, list):
            raise UpstreamError("Label Studio's file upload list is not a list")
        out: dict[int, str] = {}
        for item in body:
            if isinstance(item, dict) and isinstance(item.get("id"), int) and isinstance(item.get("file"), str):
                out[int(item["id"])] = str(item["file"])
        return out

    def import_tasks(self, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
        """Create tasks (with their annotations or predictions); the new task ids, in order."""
        resp = self.request(
            "POST",
            f"/api/projects/{int(project_id)}/import",
            params={"return_task_ids": "true", "commit_to_project": "true"},
            json_body=list(tasks),
        )
        body = _checked_json(resp, f"importing {len(tasks)} task(s) into project {project_id}")
        ids = body.get("task_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or len(ids) != len(tasks) or not all(isinstance(i, int) for i in ids):
            raise UpstreamError(f"Label Studio returned task ids {ids!r} for {len(tasks)} imported task(s)")
        return [int(i) for i in ids]

    def _post_json(self, path: str, body: Any, what: str) -> Any:
        return _checked_json(self.request("POST", path, json_body=body), what)

    def get_task(self, task_id: int) -> dict[str, Any]:
        body = self.get_json(f"/api/tasks/{int(task_id)}/")
        if not isinstance(body, dict):
            raise UpstreamError(f"Label Studio returned no task object for task {task_id}")
        return body

    def iter_tasks(
        self, project_id: int, *, page_size: int = 100, fields: Literal["all", "task_only"] = "all"
    ) -> Iterator[dict[str, Any]]:
        """Every task of a project, page by page: with its annotations and predictions
        (``fields="all"``), or only the task itself (``"task_only"``: id, data, is_labeled, counts)."""
        page, seen = 1, 0
        while True:
            resp = self.request(
                "GET",
                "/api/tasks/",
                params={"project": int(project_id), "page": page, "page_size": page_size, "fields": fields},
            )
            if resp.status_code == 404 and page > 1:  # DRF: past the last page
                return
            if not resp.ok:
                raise UpstreamError(f"Label Studio answered {resp.status_code} listing tasks of project {project_id}")
            body = _json_body(resp, "task list")
            tasks = body.get("tasks") if isinstance(body, dict) else body
            if not isinstance(tasks, list):
                raise UpstreamError("Label Studio's task list has no 'tasks' array")
            for task in tasks:
                if isinstance(task, dict):
                    yield task
            seen += len(tasks)
            total = body.get("total") if isinstance(body, dict) else None
            if not tasks or not isinstance(body, dict) or (isinstance(total, int) and seen >= total):
                return
            page += 1

    def update_task_data(
        self,
        task_id: int,
        changes: Mapping[str, Any],
        *,
        current: Mapping[str, Any] | None = None,
        remove: Collection[str] = (),
    ) -> dict[str, Any]:
        """Set keys of a task's ``data``, keeping every other key; the data as Label Studio stored it.

        Label Studio's ``PATCH /api/tasks/<id>/`` *replaces* ``data`` with what it is sent (a
        ``{"data": {"k": 1}}`` patch would drop the image URL), so the patch carries the whole data:
        ``current`` (the task's data as just read; fetched when not given) with ``changes`` set and
        the keys in ``remove`` taken out. A write between that read and this patch is lost.
        """
        if current is None:
            got = self.get_task(task_id).get("data")
            if not isinstance(got, dict):
                raise UpstreamError(f"Label Studio's task {task_id} has no data object")
            current = got
        merged = {k: v for k, v in current.items() if k not in remove}
        merged.update(changes)
        body = _checked_json(
            self.request("PATCH", f"/api/tasks/{int(task_id)}/", json_body={"data": merged}),
            f"updating the data of task {task_id}",
        )
        stored = body.get("data") if isinstance(body, dict) else None
        if not isinstance(stored, dict):
            raise UpstreamError(f"Label Studio's answer to updating task {task_id} has no data object")
        return stored

    def list_views(self, project_id: int) -> list[DataManagerView]:
        """The project's Data Manager tabs, in their order."""
        body = self.get_json("/api/dm/views/", params={"project": int(project_id)})
        if not isinstance(body, list):
            raise UpstreamError("Label Studio's Data Manager view list is not a list")
        views = [DataManagerView.from_api(v) for v in body]
        return [v for v in views if v.project in (0, int(project_id))]

    def ensure_view(
        self,
        project_id: int,
        title: str,
        *,
        filters: Mapping[str, Any] | None,
        ordering: Sequence[str],
    ) -> EnsuredView:
        """The project's Data Manager tab named ``title`` with these filters and ordering.

        The first tab with that title is reused (and its filters and ordering are set back when
        someone changed them; the rest of its data, such as the columns the UI hides, is kept);
        without one, a tab is created. Repeating the call changes nothing.
        """
        wanted_ordering = tuple(ordering)
        for view in self.list_views(project_id):
            if view.title != title:
                continue
            if same_filters(view.filters, filters) and view.ordering == wanted_ordering:
                return EnsuredView(view, created=False, updated=False)
            data = {k: v for k, v in view.data.items() if k != "selectedItems"}
            data.update(title=title, filters=_filter_group(filters), ordering=list(wanted_ordering))
            body = _checked_json(
                self.request(
                    "PATCH", f"/api/dm/views/{view.id}/", json_body={"project": int(project_id), "data": data}
                ),
                f"updating Data Manager view {view.id}",
            )
            return EnsuredView(DataManagerView.from_api(body), created=False, updated=True)
        data = {"title": title, "filters": _filter_group(filters), "ordering": list(wanted_ordering)}
        body = self._post_json(
            "/api/dm/views/", {"project": int(project_id), "data": data}, f"creating Data Manager view {title!r}"
        )
        return EnsuredView(DataManagerView.from_api(body), created=True, updated=False)

    def set_sampling(self, project_id: int, sampling: Sampling) -> bool:
        """Set the project's task sampling (``Project.sampling``); whether it changed.

        Reads the project first and writes only when the setting differs; raises when Label Studio
        does not report the new setting afterwards.
        """
        if self.get_project(project_id).get("sampling") == sampling:
            return False
        body = _checked_json(
            self.request("PATCH", f"/api/projects/{int(project_id)}/", json_body={"sampling": sampling}),
            f"setting the sampling of project {project_id}",
        )
        got = body.get("sampling") if isinstance(body, dict) else None
        if got != sampling:
            raise UpstreamError(f"Label Studio kept sampling {got!r} for project {project_id}, not {sampling!r}")
        return True

    @staticmethod
    def presign_path(task_id: int, fileuri: str) -> str:
        """Label Studio's endpoint that redirects to a presigned URL for a cloud storage URI."""
        try:
            raw = fileuri.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate from JSON: not a URI Label Studio could hold
            raise InvalidInput("the cloud storage URI is not valid Unicode text") from exc
        encoded = base64.urlsafe_b64encode(raw).decode()
        return f"/tasks/{int(task_id)}/presign/?fileuri={encoded}"


def fetch_without_credentials(
    http: requests.Session, url: str | CheckedUrl, *, timeout: tuple[float, float]
) -> requests.Response:
    """A GET with no Authorization header and no automatic redirects, to a URL the policy accepts.

    The caller follows redirects, re-checking each ``Location`` with :func:`check_redirect`.
    """
    checked = url if isinstance(url, CheckedUrl) else check_url(url)
    try:
        # Our sessions carry no auth; the explicit None drops any session-level Authorization header.
        return http.get(
            checked.url, timeout=timeout, stream=True, allow_redirects=False, headers={"Authorization": None}
        )
    except requests.RequestException as exc:
        raise UpstreamError(f"cannot fetch {checked.redacted}: {type(exc).__name__}") from exc
    except ValueError as exc:
        raise UpstreamError(_UNPARSEABLE_REDIRECT.format(checked.redacted)) from exc


def read_limited(resp: requests.Response, max_bytes: int, what: str) -> bytes:
    """The body of a streamed response, refusing more than ``max_bytes``; raises for HTTP errors."""
    try:
        if not resp.ok:
            raise UpstreamError(f"{what} answered {resp.status_code}")
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise PayloadTooLarge(f"{what} is {declared} bytes, over the {max_bytes}-byte image limit")
        chunks, total = [], 0
        try:
            for chunk in resp.iter_content(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise PayloadTooLarge(f"{what} is over the {max_bytes}-byte image limit")
                chunks.append(chunk)
        except requests.RequestException as exc:
            raise UpstreamError(f"download of {what} failed: {type(exc).__name__}") from exc
        return b"".join(chunks)
    finally:
        resp.close()


def _filter_group(filters: Mapping[str, Any] | None) -> dict[str, Any]:
    """A filter group as the Data Manager sends it; no filters is an empty ``and`` group."""
    if not filters:
        return {"conjunction": "and", "items": []}
    return {"conjunction": filters.get("conjunction") or "and", "items": list(filters.get("items") or [])}


def _checked_json(resp: requests.Response, what: str) -> Any:
    """The JSON answer of a write; an HTTP error becomes an UpstreamError with Label Studio's words."""
    if not resp.ok:
        detail = resp.text[:300].replace("\n", " ") if resp.text else ""
        raise UpstreamError(f"Label Studio answered {resp.status_code} {what}: {detail}")
    return _json_body(resp, what)


def _json_body(resp: requests.Response, what: str) -> Any:
    try:
        return resp.json()
    except ValueError as exc:
        raise UpstreamError(f"Label Studio sent a non-JSON answer for {what} (status {resp.status_code})") from exc


__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_REDIRECTS",
    "SEQUENTIAL_SAMPLING",
    "DataManagerView",
    "EnsuredView",
    "LabelStudioClient",
    "Origin",
    "Sampling",
    "TokenKind",
    "fetch_without_credentials",
    "read_limited",
    "redact_url",
    "same_filters",
    "token_kind",
]

"""The Label Studio client: both token kinds, refresh-and-retry, credentials only to Label Studio; the writes
of the ranked label stream (task data, Data Manager tabs, sampling) and ``publish_ranking`` over them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Response, jsonify, request

from backend.errors import InvalidInput, NotReady, UpstreamError
from backend.labelstudio.client import (
    SEQUENTIAL_SAMPLING,
    EnsuredView,
    LabelStudioClient,
    TokenKind,
    same_filters,
    token_kind,
)
from backend.services.ls_ranking import (
    QUEUE_KEY,
    RANK_KEY,
    VIEW_TITLE,
    annotator_view_title,
    publish_ranking,
    ranks_in_order,
)
from tests.support.fake_labelstudio import LEGACY_TOKEN, FakeCloud, FakeLabelStudio, fake_jwt
from tests.support.servers import ServedApp


@pytest.fixture
def ls() -> Iterator[tuple[FakeLabelStudio, ServedApp]]:
    fake = FakeLabelStudio()
    served = ServedApp(fake.app())
    yield fake, served
    served.close()


@pytest.fixture
def cloud() -> Iterator[tuple[FakeCloud, ServedApp]]:
    fake = FakeCloud()
    served = ServedApp(fake.app(), host="localhost")  # another host name than 127.0.0.1
    yield fake, served
    served.close()


def test_token_kind_tells_pat_from_legacy() -> None:
    assert token_kind(LEGACY_TOKEN) is TokenKind.LEGACY
    assert token_kind(fake_jwt()) is TokenKind.PERSONAL
    assert token_kind("a.b.c") is TokenKind.LEGACY  # three parts but no JWT header


def test_missing_configuration_says_what_to_set() -> None:
    with pytest.raises(NotReady, match="LABEL_STUDIO_URL"):
        LabelStudioClient("", LEGACY_TOKEN)
    with pytest.raises(NotReady, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient("http://127.0.0.1:1", "")


def test_legacy_token_is_sent_as_token_header(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    fake, served = ls
    fake.projects[3] = {"id": 3, "title": "p", "label_config": "<View/>"}
    client = LabelStudioClient(served.url, f"Token {LEGACY_TOKEN}")  # a pasted header value works too
    assert client.get_project(3)["id"] == 3
    assert fake.seen[-1].authorization == f"Token {LEGACY_TOKEN}"
    assert fake.refreshes == 0


def test_pat_is_exchanged_refreshed_on_401_and_retried_once(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    fake, served = ls
    fake.projects[1] = {"id": 1, "title": "p", "label_config": "<View/>"}
    client = LabelStudioClient(served.url, fake.pat)
    assert client.get_project(1)["id"] == 1
    assert fake.refreshes == 1
    assert fake.seen[-1].authorization is not None and fake.seen[-1].authorization.startswith("Bearer access-1-")
    client.get_project(1)
    assert fake.refreshes == 1  # the access token is reused while it works
    fake.expire_access_tokens()
    assert client.get_project(1)["id"] == 1
    assert fake.refreshes == 2
    statuses = [s.path for s in fake.seen]
    assert statuses.count("/api/token/refresh/") == 2


def test_revoked_pat_and_refused_legacy_token_raise_upstream_errors(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    _, served = ls
    with pytest.raises(UpstreamError, match="personal access token"):
        LabelStudioClient(served.url, fake_jwt("someone-else")).get_project(1)
    with pytest.raises(UpstreamError, match="legacy tokens are disabled"):
        LabelStudioClient(served.url, "f" * 40).get_project(1)


def test_pat_retries_only_once(ls: tuple[FakeLabelStudio, ServedApp], monkeypatch: pytest.MonkeyPatch) -> None:
    fake, served = ls
    client = LabelStudioClient(served.url, fake.pat)
    # Every access token is rejected: one refresh-and-retry, then a clear error, no loop.
    monkeypatch.setattr(fake, "valid_access", type("Never", (set,), {"__contains__": lambda self, x: False})())
    with pytest.raises(UpstreamError, match="401"):
        client.get_project(1)
    assert fake.refreshes == 2


def test_credentials_never_leave_the_label_studio_origin(
    ls: tuple[FakeLabelStudio, ServedApp], cloud: tuple[FakeCloud, ServedApp]
) -> None:
    fake, served = ls
    fake_cloud, cloud_served = cloud
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    with pytest.raises(InvalidInput, match="refusing to send Label Studio credentials"):
        client.request("GET", f"{cloud_served.url}/bucket/a.png")
    # Same host, other port: another origin.
    with pytest.raises(InvalidInput):
        client.request("GET", f"http://127.0.0.1:{served.port + 1}/x")
    assert fake_cloud.seen == []
    # A redirect from Label Studio to another host is followed without the Authorization header.
    fake.cloud_url = cloud_served.url
    fake_cloud.files["/bucket/a.png"] = b"\x89PNG-bytes"
    data = client.download(client.presign_path(7, "s3://bucket/a.png"), max_bytes=1024)
    assert data == b"\x89PNG-bytes"
    assert [s.authorization for s in fake_cloud.seen] == [None]
    with pytest.raises(InvalidInput, match="redirected to another host"):
        client.download(client.presign_path(7, "s3://bucket/a.png"), max_bytes=1024, foreign_allowed=False)


def test_iter_tasks_walks_every_page(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    fake, served = ls
    for i in range(1, 8):
        fake.tasks[i] = {"id": i, "project": 5, "data": {"image": f"/data/upload/5/{i}.png"}, "annotations": []}
    fake.tasks[99] = {"id": 99, "project": 6, "data": {}, "annotations": []}
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    assert [t["id"] for t in client.iter_tasks(5, page_size=3)] == list(range(1, 8))
    assert all("fields=all" in s.path for s in fake.seen if s.path.startswith("/api/tasks/"))


def test_unreachable_label_studio_is_an_upstream_error() -> None:
    from tests.support.servers import free_port

    client = LabelStudioClient(f"http://127.0.0.1:{free_port()}", LEGACY_TOKEN)
    with pytest.raises(UpstreamError, match="cannot reach Label Studio"):
        client.get_project(1)


def test_repr_and_errors_never_show_the_key(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    fake, served = ls
    client = LabelStudioClient(served.url, fake.pat)
    assert fake.pat not in repr(client)
    with pytest.raises(UpstreamError) as info:
        LabelStudioClient(served.url, "f" * 40).get_project(1)
    assert "f" * 40 not in str(info.value)


def test_a_backslash_or_user_info_trick_cannot_borrow_the_label_studio_origin(
    ls: tuple[FakeLabelStudio, ServedApp], cloud: tuple[FakeCloud, ServedApp]
) -> None:
    """``http://other\\@label-studio/x``: urllib reads Label Studio's host, requests connects to ``other``."""
    fake, served = ls
    fake_cloud, cloud_served = cloud
    fake.files["/data/upload/1/a.png"] = b"\x89PNG-bytes"
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    other = f"{cloud_served.host}:{cloud_served.port}"
    here = f"127.0.0.1:{served.port}"
    for url in (
        f"http://{other}\\@{here}/data/upload/1/a.png",
        f"http://{other}%5C@{here}/data/upload/1/a.png",
        f"http://{here}@{other}/data/upload/1/a.png",
        f"http://{other}\t@{here}/data/upload/1/a.png",
    ):
        assert not client.is_label_studio_url(url)
        with pytest.raises(InvalidInput):
            client.download(url, max_bytes=1024)
    assert fake_cloud.seen == []


# -- writes for the ranked label stream (backend/services/ls_ranking.py) ---------------------------------
# The fake grows the endpoints these use, with Label Studio 1.23's semantics where they matter: a task
# PATCH *replaces* its data; views keep their ``data`` (title, filters, ordering, what the UI adds).
# That Label Studio itself behaves so is proven by tests/test_labelstudio_e2e.py.
@pytest.fixture
def dm() -> Iterator[tuple[FakeLabelStudio, ServedApp, dict[int, dict[str, Any]]]]:
    fake = FakeLabelStudio()
    app = fake.app()
    views: dict[int, dict[str, Any]] = {}

    @app.patch("/api/tasks/<int:task_id>/")
    def patch_task(task_id: int) -> Response:
        body = request.get_json() or {}
        fake.tasks[task_id]["data"] = body["data"]  # replaced, not merged
        return jsonify(fake.tasks[task_id])

    @app.get("/api/dm/views/")
    def list_views() -> Response:
        project = int(request.args["project"])
        return jsonify([v for v in views.values() if v["project"] == project])

    @app.post("/api/dm/views/")
    def create_view() -> tuple[Response, int]:
        body = request.get_json() or {}
        view_id = len(views) + 1
        views[view_id] = {"id": view_id, "project": body["project"], "data": body["data"]}
        return jsonify(views[view_id]), 201

    @app.patch("/api/dm/views/<int:view_id>/")
    def patch_view(view_id: int) -> Response:
        views[view_id]["data"] = (request.get_json() or {})["data"]
        return jsonify(views[view_id])

    @app.patch("/api/projects/<int:project_id>/")
    def patch_project(project_id: int) -> Response:
        fake.projects[project_id].update(request.get_json() or {})
        return jsonify(fake.projects[project_id])

    served = ServedApp(app)
    yield fake, served, views
    served.close()


def _writes(fake: FakeLabelStudio) -> list[str]:
    return [f"{s.method} {s.path.split('?')[0]}" for s in fake.seen if s.method in ("POST", "PATCH", "PUT", "DELETE")]


def test_update_task_data_keeps_every_other_key(dm: tuple[FakeLabelStudio, ServedApp, dict[int, Any]]) -> None:
    fake, served, _ = dm
    fake.tasks[1] = {"id": 1, "project": 5, "data": {"image": "/data/upload/5/a.png", "subject": "s1"}}
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    stored = client.update_task_data(1, {"sonoseg_rank": "00000001"})  # reads the task first
    assert stored == {"image": "/data/upload/5/a.png", "subject": "s1", "sonoseg_rank": "00000001"}
    stored = client.update_task_data(1, {"sonoseg_rank": "00000002"}, current=stored, remove=("subject",))
    assert stored == {"image": "/data/upload/5/a.png", "sonoseg_rank": "00000002"}
    assert [s.method for s in fake.seen] == ["GET", "PATCH", "PATCH"]


def test_ensure_view_finds_creates_and_sets_back_only_what_changed(
    dm: tuple[FakeLabelStudio, ServedApp, dict[int, Any]],
) -> None:
    fake, served, views = dm
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    item = {"filter": "filter:tasks:completed_at", "operator": "empty", "type": "Datetime", "value": True}
    filters = {"conjunction": "and", "items": [item]}
    made = client.ensure_view(5, "next", filters=filters, ordering=["tasks:data.rank"])
    assert (made.created, made.updated, made.view.ordering, made.view.title) == (
        True,
        False,
        ("tasks:data.rank",),
        "next",
    )
    assert made.view.filters == filters
    assert client.ensure_view(5, "next", filters=filters, ordering=["tasks:data.rank"]) == EnsuredView(
        made.view, created=False, updated=False
    )
    # The web UI saves the tab with its own extras (a column's type, empty child filters, hidden columns):
    # the same filters, so nothing is written.
    views[made.view.id]["data"]["filters"]["items"][0].update(type="Unknown", child_filter=None)
    views[made.view.id]["data"]["hiddenColumns"] = {"explore": ["tasks:inner_id"]}
    before = len(_writes(fake))
    assert not client.ensure_view(5, "next", filters=filters, ordering=["tasks:data.rank"]).updated
    assert len(_writes(fake)) == before
    # Someone re-sorted the tab: set back, keeping what the UI added; another project's tab is another tab.
    views[made.view.id]["data"]["ordering"] = ["-tasks:id"]
    fixed = client.ensure_view(5, "next", filters=filters, ordering=["tasks:data.rank"])
    assert (fixed.updated, fixed.view.id, fixed.view.ordering) == (True, made.view.id, ("tasks:data.rank",))
    assert fixed.view.data["hiddenColumns"] == {"explore": ["tasks:inner_id"]}
    assert client.ensure_view(6, "next", filters=None, ordering=()).created
    assert same_filters(None, {"conjunction": "or", "items": []}) and not same_filters(filters, None)


def test_set_sampling_writes_only_a_change(dm: tuple[FakeLabelStudio, ServedApp, dict[int, Any]]) -> None:
    fake, served, _ = dm
    fake.projects[5] = {"id": 5, "title": "p", "sampling": "Uniform sampling"}
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    assert client.set_sampling(5, SEQUENTIAL_SAMPLING) is True
    assert client.set_sampling(5, SEQUENTIAL_SAMPLING) is False
    assert fake.projects[5]["sampling"] == SEQUENTIAL_SAMPLING
    assert _writes(fake) == ["PATCH /api/projects/5/"]


def test_publish_ranking_ranks_the_rest_after_and_writes_only_changes(
    dm: tuple[FakeLabelStudio, ServedApp, dict[int, Any]],
) -> None:
    fake, served, views = dm
    fake.projects[5] = {"id": 5, "title": "p", "sampling": "Uniform sampling"}
    for i in range(1, 6):
        fake.tasks[i] = {"id": i, "project": 5, "data": {"image": f"/data/upload/5/{i}.png"}, "is_labeled": i == 5}
    client = LabelStudioClient(served.url, LEGACY_TOKEN)

    def ranks() -> dict[int, str | None]:
        return {i: t["data"].get(RANK_KEY) for i, t in fake.tasks.items()}

    first = publish_ranking(client, 5, [(3, 10), (1, 20), (99, 30)])  # ranks need not be consecutive
    assert ranks() == {3: "00000001", 1: "00000002", 2: "00000003", 4: "00000004", 5: None}  # the rest by id
    assert (first.tasks_ranked, first.tasks_queued, first.tasks_updated, first.missing) == (2, 4, 4, (99,))
    assert first.view_created and first.sampling_changed and first.changed
    assert all(t["data"]["image"] == f"/data/upload/5/{i}.png" for i, t in fake.tasks.items())
    (view,) = views.values()
    assert view["data"]["title"] == VIEW_TITLE and view["data"]["ordering"] == ["tasks:data.sonoseg_rank"]

    before = len(_writes(fake))
    again = publish_ranking(client, 5, [(3, 10), (1, 20), (99, 30)])
    assert not again.changed and again.tasks_unchanged == 4 and len(_writes(fake)) == before

    moved = publish_ranking(client, 5, ranks_in_order([4]))  # the others keep their previous order, after it
    assert ranks() == {4: "00000001", 3: "00000002", 1: "00000003", 2: "00000004", 5: None}
    assert moved.tasks_updated == 4 and not moved.view_created
    with pytest.raises(InvalidInput, match="ranked twice"):
        publish_ranking(client, 5, [(1, 1), (1, 2)])


def test_publish_ranking_deals_tasks_out_to_annotator_tabs_and_takes_them_back(
    dm: tuple[FakeLabelStudio, ServedApp, dict[int, Any]],
) -> None:
    fake, served, views = dm
    fake.projects[5] = {"id": 5, "title": "p", "sampling": SEQUENTIAL_SAMPLING}
    for i in range(1, 6):
        fake.tasks[i] = {"id": i, "project": 5, "data": {"image": f"/data/upload/5/{i}.png"}, "is_labeled": False}
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    published = publish_ranking(client, 5, ranks_in_order([5, 4, 3, 2, 1]), annotators=["ann@x", "bob@x"])
    assert {i: t["data"][QUEUE_KEY] for i, t in fake.tasks.items()} == {
        5: "ann@x",
        4: "bob@x",
        3: "ann@x",
        2: "bob@x",
        1: "ann@x",
    }
    assert not published.sampling_changed and published.annotator_views_written == 2
    ann = views[published.annotator_views["ann@x"]]["data"]
    assert ann["title"] == annotator_view_title("ann@x") and ann["ordering"] == ["tasks:data.sonoseg_rank"]
    assert ann["filters"]["items"][-1] == {
        "filter": "filter:tasks:data.sonoseg_queue",
        "operator": "equal",
        "type": "String",
        "value": "ann@x",
    }
    # Without annotators, nothing is dealt out any more (emptied: the key stays for the web UI's filters).
    alone = publish_ranking(client, 5, ranks_in_order([5, 4, 3, 2, 1]))
    assert alone.tasks_updated == 5 and alone.annotator_views == {}
    assert {t["data"][QUEUE_KEY] for t in fake.tasks.values()} == {""}
    with pytest.raises(InvalidInput, match="listed twice"):
        publish_ranking(client, 5, [], annotators=["ann@x", "ann@x"])


def test_al_publish_ranks_the_pool_with_the_serving_models_scores_into_label_studio(
    dm: tuple[FakeLabelStudio, ServedApp, dict[int, Any]], tmp_path: Any
) -> None:
    """`sonoseg al publish`: the database's ranking (cached scores of the serving version) reaches the
    tasks' ``sonoseg_rank``; a project not linked to Label Studio is a clear error."""
    import numpy as np
    from click.testing import CliRunner

    from backend.db.migrate import upgrade
    from backend.db.models import ImageSource, Project
    from backend.db.session import make_engine, make_session_factory, unit_of_work
    from backend.model.scores import ImageScores
    from backend.services.images import SourceInfo, add_image
    from backend.services.scores import store_scores
    from backend.settings import Settings
    from backend.storage.blobs import LocalBlobStore
    from cli.main import cli
    from tests.support.frames import synthetic_frame
    from tests.support.models import record_version

    fake, served, _views = dm
    settings = Settings(data_dir=tmp_path / "data", label_studio_url=served.url, label_studio_api_key=LEGACY_TOKEN)
    settings.data_dir.mkdir()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    store = LocalBlobStore(settings.store_dir)
    fake.projects[5] = {"id": 5, "title": "p", "sampling": "Uniform sampling"}
    entropies = {1: 0.2, 2: 0.9, 3: 0.5}  # task id -> entropy: the entropy strategy ranks 2, 3, 1
    with unit_of_work(factory) as s:
        project = Project(name="p", class_names=["Nerve", "Vessel"], ls_project_id=5)
        s.add_all([project, Project(name="offline", class_names=["Nerve"])])
        s.flush()
        by_image: dict[int, ImageScores] = {}
        for task_id, entropy in entropies.items():
            frame, _ = synthetic_frame(task_id, (24, 24))
            image = add_image(s, store, project, frame, subject=f"s{task_id}", source=SourceInfo("import")).image
            image.split = "train"
            s.add(ImageSource(project_id=project.id, image_id=image.id, kind="labelstudio", ls_task_id=task_id))
            fake.tasks[task_id] = {"id": task_id, "project": 5, "data": {"image": f"/data/upload/5/{task_id}.png"}}
            vector = np.zeros(8, np.float32)
            vector[task_id] = 1.0
            by_image[image.id] = ImageScores(entropy, 0.1, 0.1, 0.3, vector)
        s.flush()
        store_scores(s, record_version(s, project).id, by_image)
    env = settings.to_env()
    out = CliRunner().invoke(cli, ["al", "publish", "--project", "p", "--strategy", "entropy", "--json"], env=env)
    assert out.exit_code == 0, out.output
    assert {i: t["data"][RANK_KEY] for i, t in fake.tasks.items()} == {2: "00000001", 3: "00000002", 1: "00000003"}
    assert fake.projects[5]["sampling"] == SEQUENTIAL_SAMPLING
    assert '"tasks_ranked": 3' in out.output and '"strategy": "entropy"' in out.output
    unlinked = CliRunner().invoke(cli, ["al", "publish", "--project", "offline"], env=env)
    assert unlinked.exit_code != 0 and "not linked to Label Studio" in unlinked.output

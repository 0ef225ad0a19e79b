"""The work list: leases are exclusive under concurrency, expire back into the pool, end with a submitted
annotation; lead time is stored; ``sonoseg next`` and ``GET /api/next`` refuse bad input with a 4xx.
Real databases: SQLite, and PostgreSQL when configured."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from backend.active_learning.candidates import Candidate
from backend.api.app import AppState, create_app
from backend.db.models import Image, LabelLease, MaskVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.labelstudio.payloads import LsAnnotation
from backend.model.scores import ImageScores
from backend.services.annotations import apply_annotation
from backend.services.images import SourceInfo, add_image
from backend.services.scores import store_scores
from backend.services.worklist import Lease, _claim, lease_next, release_for_image
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.models import record_version
from tests.support.payloads import annotation

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class TopEntropy:
    """A deterministic strategy for these tests: highest entropy first (every caller wants the same images)."""

    name: str = "top_entropy"

    def select(
        self, pool: Sequence[Candidate], n: int, rng: np.random.Generator, labelled: Sequence[Candidate] = ()
    ) -> list[int]:
        return [c.image_id for c in sorted(pool, key=lambda c: (-c.entropy, c.image_id))[:n]]


def scores(entropy: float, dim: int = 8) -> ImageScores:
    vector = np.zeros(dim, np.float32)
    vector[int(entropy * 100) % dim] = 1.0
    return ImageScores(entropy, 0.1, 0.2, 0.3, vector)


def make_pool(factory: SessionFactory, k: int, *, score: bool = True, name: str = "p") -> tuple[int, list[int]]:
    """A project with ``k`` unlabelled training images (scored by its serving version, entropy rising with id)."""
    with unit_of_work(factory) as s:
        project = Project(name=name, class_names=["Nerve", "Vessel"])
        s.add(project)
        s.flush()
        images = [
            Image(
                project_id=project.id,
                sha256=f"{i:064x}",
                blob_key=f"images/{i}.png",
                width=4,
                height=3,
                subject=f"subj-{i}",
                split="train",
                source_format="png",
            )
            for i in range(k)
        ]
        s.add_all(images)
        s.flush()
        ids = [img.id for img in images]
        if score:
            version = record_version(s, project)
            store_scores(s, version.id, {image_id: scores(0.1 + 0.1 * j) for j, image_id in enumerate(ids)})
        return project.id, ids


def lease(
    factory: SessionFactory, pid: int, who: str, n: int, now: dt.datetime = T0, ttl: float = 600.0, seed: int = 0
) -> list[Lease]:
    with unit_of_work(factory) as s:
        return lease_next(s, s.get_one(Project, pid), who, n, ttl, TopEntropy(), np.random.default_rng(seed), now)


def ids(leases: Sequence[Lease]) -> list[int]:
    return [lease.image_id for lease in leases]


# -- leases -----------------------------------------------------------------------------------------------
def _ask_at_once(factory: SessionFactory, pid: int, n: int, seed: int) -> dict[str, list[int]]:
    """Two threads, each with its own session, released together by a barrier, each asking for ``n``."""
    barrier = threading.Barrier(2)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def ask(who: str) -> None:
        try:
            barrier.wait(timeout=10)
            got[who] = ids(lease(factory, pid, who, n, seed=seed))
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(who,)) for who in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return got


def test_two_annotators_asking_at_once_never_get_the_same_image(factory: SessionFactory) -> None:
    pid, pool = make_pool(factory, 4)
    for round_ in range(6):
        with unit_of_work(factory) as s:
            s.execute(delete(LabelLease))
        got = _ask_at_once(factory, pid, 3, round_)
        assert not set(got["alice"]) & set(got["bob"]), got
        assert sorted(got["alice"] + got["bob"]) == sorted(pool)  # 3 + 1: the pool is shared out, whole
        with factory() as s:
            holders = dict(s.execute(select(LabelLease.image_id, LabelLease.annotator)).all())
        assert holders == {i: who for who, leased in got.items() for i in leased}


def test_ranked_best_first_and_own_live_leases_come_back_first_renewed(factory: SessionFactory) -> None:
    pid, pool = make_pool(factory, 5)
    first = lease(factory, pid, "alice", 2, ttl=60)
    assert ids(first) == [pool[4], pool[3]] and [x.rank for x in first] == [1, 2]
    assert all(x.annotator == "alice" and x.expires_at == T0 + dt.timedelta(seconds=60) for x in first)
    later = T0 + dt.timedelta(seconds=30)
    again = lease(factory, pid, "alice", 3, now=later, ttl=60)
    assert ids(again) == [pool[4], pool[3], pool[2]]  # own leases first, then the next best
    assert {x.expires_at for x in again} == {later + dt.timedelta(seconds=60)}  # renewed
    assert ids(lease(factory, pid, "bob", 5, now=later)) == [pool[1], pool[0]]


def test_an_expired_lease_returns_to_the_pool(factory: SessionFactory) -> None:
    pid, pool = make_pool(factory, 2)
    assert sorted(ids(lease(factory, pid, "alice", 2, ttl=60))) == sorted(pool)
    assert lease(factory, pid, "bob", 2, now=T0 + dt.timedelta(seconds=59)) == []
    taken = lease(factory, pid, "bob", 2, now=T0 + dt.timedelta(seconds=61))  # alice's ran out: taken over
    assert sorted(ids(taken)) == sorted(pool)
    assert lease(factory, pid, "alice", 2, now=T0 + dt.timedelta(seconds=62)) == []
    with factory() as s:
        assert set(s.scalars(select(LabelLease.annotator))) == {"bob"}
        assert s.scalar(select(LabelLease.id).where(LabelLease.annotator == "alice")) is None


def test_a_claim_that_loses_the_race_moves_on(factory: SessionFactory) -> None:
    """The database is the guarantee: with a live lease on an image, a second claim fails (and leaves the
    transaction usable); with an expired one, it takes the lease over."""
    pid, pool = make_pool(factory, 3)
    assert ids(lease(factory, pid, "alice", 1, ttl=60)) == [pool[2]]
    later = T0 + dt.timedelta(seconds=10)
    with unit_of_work(factory) as s:
        assert not _claim(s, pid, pool[2], "bob", later, later + dt.timedelta(seconds=60))
        assert _claim(s, pid, pool[1], "bob", later, later + dt.timedelta(seconds=60))  # the session goes on
    much_later = T0 + dt.timedelta(seconds=120)
    with unit_of_work(factory) as s:
        assert _claim(s, pid, pool[2], "bob", much_later, much_later + dt.timedelta(seconds=60))
    with factory() as s:
        assert dict(s.execute(select(LabelLease.image_id, LabelLease.annotator)).all()) == {
            pool[2]: "bob",
            pool[1]: "bob",
        }


@pytest.mark.postgres
def test_a_lease_committed_between_ranking_and_claiming_is_skipped(postgres_url: str) -> None:
    """PostgreSQL (SQLite transactions are serial, so there the race cannot happen): another transaction
    commits a lease of the top image after the strategy ranked it; the claim loses and the next one is taken."""
    from backend.db.session import make_engine, make_session_factory

    engine = make_engine(postgres_url)
    try:
        factory = make_session_factory(engine)
        pid, pool = make_pool(factory, 3)

        class Sneaky(TopEntropy):
            def select(
                self, pool_: Sequence[Candidate], n: int, rng: np.random.Generator, labelled: Sequence[Candidate] = ()
            ) -> list[int]:
                picks = super().select(pool_, n, rng)
                if pool[2] in picks:
                    with unit_of_work(factory) as other:  # no advisory lock: a writer that bypasses lease_next
                        other.add(
                            LabelLease(
                                image_id=pool[2],
                                project_id=pid,
                                annotator="carol",
                                leased_at=T0,
                                expires_at=T0 + dt.timedelta(hours=1),
                            )
                        )
                return picks

        with unit_of_work(factory) as s:
            got = lease_next(s, s.get_one(Project, pid), "alice", 1, 600, Sneaky(), np.random.default_rng(0), T0)
        assert ids(got) == [pool[1]]
    finally:
        engine.dispose()


def test_coverage_counts_labelled_and_leased_frames_as_covered(factory: SessionFactory) -> None:
    """A ``coverage`` project scores its labelled train images too (their embeddings say what is
    covered); its next frame comes from a clip that is neither labelled nor leased to someone else."""
    from backend.services.scores import labelled_candidates, projects_awaiting_scores, unscored_images
    from backend.services.worklist import hand_out, set_strategy

    def clip(j: int) -> ImageScores:  # three clips: embeddings along three directions
        v = np.zeros(8, np.float32)
        v[j] = 1.0
        return ImageScores(0.5, 0.1, 0.2, 0.3, v + np.float32(0.01) * np.arange(8, dtype=np.float32) / 8)

    pid, image_ids = make_pool(factory, 9, score=False)
    clip_of = {image_id: j // 3 for j, image_id in enumerate(image_ids)}
    with unit_of_work(factory) as s:
        project = s.get_one(Project, pid)
        set_strategy(s, project, "coverage")
        version = record_version(s, project)
        s.add(
            MaskVersion(
                image_id=image_ids[0], version=1, source="import", blob_key="m/0.png", sha256="0" * 64, is_current=True
            )
        )  # clip 0 is labelled
        s.flush()
        assert [p.image_id for p in unscored_images(s, project, version.id)] == image_ids  # the labelled one too
        assert projects_awaiting_scores(s) == [pid]
        store_scores(s, version.id, {image_id: clip(clip_of[image_id]) for image_id in image_ids})
        assert projects_awaiting_scores(s) == []
        assert [c.image_id for c in labelled_candidates(s, project, version.id)] == [image_ids[0]]
    with unit_of_work(factory) as s:  # bob holds a frame of clip 1
        first = hand_out(s, s.get_one(Project, pid), "bob", 1, rng=np.random.default_rng(0), now=T0)
    bob_clip = clip_of[first.leases[0].image_id]
    assert bob_clip != 0
    with unit_of_work(factory) as s:
        second = hand_out(s, s.get_one(Project, pid), "alice", 1, rng=np.random.default_rng(0), now=T0)
    assert clip_of[second.leases[0].image_id] not in {0, bob_clip}


def test_without_scores_the_pool_comes_in_random_order(factory: SessionFactory) -> None:
    pid, pool = make_pool(factory, 4, score=False)  # no model serves yet
    got = lease(factory, pid, "alice", 3)
    assert len(got) == 3 and set(ids(got)) <= set(pool) and len(set(ids(got))) == 3
    assert sorted(ids(got) + ids(lease(factory, pid, "bob", 3))) == sorted(pool)


def test_bad_arguments_are_refused(factory: SessionFactory) -> None:
    from backend.errors import InvalidInput

    pid, _ = make_pool(factory, 1)
    for who, n, ttl, now in (
        ("", 1, 60.0, T0),
        ("a", 0, 60.0, T0),
        ("a", 101, 60.0, T0),
        ("a", 1, 0.0, T0),
        ("a", 1, float("nan"), T0),
        ("a", 1, 60.0, T0.replace(tzinfo=None)),
    ):
        with pytest.raises(InvalidInput):
            lease(factory, pid, who, n, now=now, ttl=ttl)


# -- annotations end leases; lead time -------------------------------------------------------------------
@pytest.fixture
def labelled_world(factory: SessionFactory, store: LocalBlobStore) -> tuple[int, list[int]]:
    """A project with three stored 6 x 8 training frames, scored by a serving version."""
    rng = np.random.default_rng(3)
    with unit_of_work(factory) as s:
        project = Project(name="p", class_names=["Nerve", "Vessel"], label_config=DEFAULT_LABEL_CONFIG)
        s.add(project)
        s.flush()
        image_ids = []
        for i in range(3):
            added = add_image(
                s,
                store,
                project,
                rng.integers(0, 255, (6, 8), dtype=np.uint8),
                subject="subj-1",
                source=SourceInfo("labelstudio", ls_task_id=100 + i),
                split="train",
            )
            s.flush()
            image_ids.append(added.image.id)
        version = record_version(s, project)
        store_scores(s, version.id, {image_id: scores(0.5 + 0.1 * j) for j, image_id in enumerate(image_ids)})
        return project.id, image_ids


def _apply(factory: SessionFactory, store: LocalBlobStore, pid: int, image_id: int, raw: dict[str, Any]) -> str:
    with unit_of_work(factory) as s:
        project = s.get_one(Project, pid)
        outcome = apply_annotation(
            s, store, project, parse_label_config(DEFAULT_LABEL_CONFIG), image_id, LsAnnotation.parse(raw)
        )
        return outcome.kind


def test_a_submitted_annotation_ends_the_lease_and_stores_its_lead_time(
    factory: SessionFactory, store: LocalBlobStore, labelled_world: tuple[int, list[int]]
) -> None:
    pid, images = labelled_world
    got = lease(factory, pid, "alice", 3)
    assert {x.ls_task_id for x in got} == {100, 101, 102}
    mask = np.zeros((6, 8), np.uint8)
    mask[1:4, 2:6] = 1
    assert _apply(factory, store, pid, images[0], annotation(7, 100, mask)) == "created"
    assert _apply(factory, store, pid, images[1], annotation(8, 101, None, cancelled=True)) == "ignored"
    with factory() as s:
        assert set(s.scalars(select(LabelLease.image_id))) == {images[1], images[2]}  # a skip keeps its lease
        mv = s.scalars(select(MaskVersion).where(MaskVersion.ls_annotation_id == 7)).one()
        assert mv.lead_time_seconds == 12.5  # Label Studio's lead_time, from the annotation payload
    # the labelled image has left the pool: asking again returns the other two only
    assert sorted(ids(lease(factory, pid, "alice", 3))) == sorted(images[1:])
    # a replay does not end a lease someone holds now (reconciliation replays every annotation)
    assert _apply(factory, store, pid, images[0], annotation(7, 100, mask)) == "unchanged"
    with factory() as s:
        assert set(s.scalars(select(LabelLease.image_id))) == {images[1], images[2]}


def test_lead_time_is_filled_in_by_a_replay_that_has_it(
    factory: SessionFactory, store: LocalBlobStore, labelled_world: tuple[int, list[int]]
) -> None:
    pid, images = labelled_world
    mask = np.zeros((6, 8), np.uint8)
    mask[0:2, 0:3] = 2
    raw = annotation(9, 100, mask)
    without = {k: v for k, v in raw.items() if k != "lead_time"}
    assert _apply(factory, store, pid, images[0], without) == "created"
    with factory() as s:
        assert s.scalars(select(MaskVersion.lead_time_seconds).where(MaskVersion.ls_annotation_id == 9)).one() is None
    assert _apply(factory, store, pid, images[0], {**raw, "lead_time": 41.0}) == "unchanged"
    with factory() as s:
        assert s.scalars(select(MaskVersion.lead_time_seconds).where(MaskVersion.ls_annotation_id == 9)).one() == 41.0


def test_release_for_image(factory: SessionFactory) -> None:
    pid, pool = make_pool(factory, 2)
    lease(factory, pid, "alice", 2)
    with unit_of_work(factory) as s:
        assert release_for_image(s, pool[0]) and not release_for_image(s, pool[0])
    assert ids(lease(factory, pid, "bob", 2)) == [pool[0]]


# -- the command line -------------------------------------------------------------------------------------
def test_next_command(factory: SessionFactory, settings: Settings) -> None:
    import json

    from cli.main import cli

    pid, pool = make_pool(factory, 3, name="nerves")
    runner = CliRunner()
    env = settings.to_env()
    out = runner.invoke(cli, ["next", "--project", "nerves", "--annotator", "alice", "-n", "2", "--json"], env=env)
    assert out.exit_code == 0, out.output
    body = json.loads(out.output)
    assert body["project_id"] == pid and body["annotator"] == "alice" and body["strategy"] == "default"
    assert body["model_version"] is not None and len(body["leases"]) == 2
    assert {x["image_id"] for x in body["leases"]} <= set(pool) and [x["rank"] for x in body["leases"]] == [1, 2]
    text = runner.invoke(cli, ["next", "--project", str(pid), "--annotator", "bob", "-n", "5"], env=env)
    assert text.exit_code == 0 and "1 image(s) for bob" in text.output, text.output
    assert (
        "nothing to label"
        in runner.invoke(cli, ["next", "--project", "nerves", "--annotator", "carol"], env=env).output
    )
    strategy = runner.invoke(cli, ["next", "--project", "nerves", "--set-strategy", "entropy"], env=env)
    assert strategy.exit_code == 0 and "entropy" in strategy.output
    with factory() as s:
        assert s.get_one(Project, pid).al_strategy == "entropy"
    for args, code, message in (
        (["--project", "nope", "--annotator", "a"], 1, "no project 'nope'"),
        (["--project", "nerves", "--annotator", "a", "-n", "0"], 2, "-n"),
        (["--project", "nerves", "--annotator", "a", "-n", "101"], 2, "-n"),
        (["--project", "nerves", "--annotator", "a", "--ttl", "0"], 2, "--ttl"),
        (["--project", "nerves", "--annotator", "  "], 1, "annotator is required"),
        (["--project", "nerves", "--set-strategy", "bogus"], 1, "unknown strategy 'bogus'"),
        (["--project", "nerves", "--annotator", "a", "--strategy", "bogus"], 1, "unknown strategy 'bogus'"),
    ):
        result = runner.invoke(cli, ["next", *args], env=env)
        assert result.exit_code == code and message in result.output, (args, result.output)


# -- HTTP ---------------------------------------------------------------------------------------------------
USER, PASSWORD = "ls-user", "pa55-w0rd-xyz"


@pytest.fixture
def http(db_url: str, tmp_path: Any) -> Iterator[tuple[FlaskClient, SessionFactory]]:
    settings = Settings(
        data_dir=tmp_path / "http", database_url=db_url, basic_auth_user=USER, basic_auth_password=PASSWORD
    )
    app = create_app(settings, start_background=False)
    state: AppState = app.extensions["sonoseg"]
    yield app.test_client(), state.factory
    state.close()


def _auth() -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def test_next_over_http(http: tuple[FlaskClient, SessionFactory]) -> None:
    client, factory = http
    pid, pool = make_pool(factory, 3, name="nerves")
    assert client.get("/api/next?project=nerves&annotator=alice").status_code == 401  # the same basic auth
    ok = client.get("/api/next?project=nerves&annotator=alice&n=2", headers=_auth())
    assert ok.status_code == 200, ok.json
    assert ok.json is not None and ok.json["strategy"] == "default" and ok.json["model_version"]
    first = [x["image_id"] for x in ok.json["leases"]]
    assert len(set(first)) == 2 and set(first) <= set(pool)
    again = client.get(f"/api/next?project={pid}&annotator=alice&n=2", headers=_auth())  # by id: the same two
    assert again.json is not None and [x["image_id"] for x in again.json["leases"]] == first
    for query, status, message in (
        ("annotator=alice", 400, "'project' parameter"),
        ("project=nerves", 400, "annotator is required"),
        ("project=nerves&annotator=", 400, "annotator is required"),
        ("project=nope&annotator=a", 404, "no project 'nope'"),
        ("project=999&annotator=a", 404, "no project"),
        ("project=nerves&annotator=a&n=0", 400, "from 1 to 100"),
        ("project=nerves&annotator=a&n=101", 400, "from 1 to 100"),
        ("project=nerves&annotator=a&n=two", 400, "whole number"),
        ("project=nerves&annotator=a&n=1.5", 400, "whole number"),
        ("project=nerves&annotator=a&ttl=nan", 400, "ttl"),
        ("project=nerves&annotator=a&ttl=-5", 400, "lease time"),
        ("project=nerves&annotator=a&strategy=bogus", 400, "unknown strategy"),
        ("project=nerves&annotator=" + "x" * 201, 400, "characters"),
        ("project=ner%00ves&annotator=a", 400, "control characters"),
        ("project=nerves&annotator=a%00b", 400, "control characters"),
    ):
        response = client.get(f"/api/next?{query}", headers=_auth())
        assert response.status_code == status, (query, response.json)
        assert response.json is not None and message in response.json["error"], (query, response.json)


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    project=st.one_of(st.none(), st.sampled_from(["nerves", "1", "0", "-1", "a\x00b"]), st.text(max_size=30)),
    annotator=st.one_of(st.none(), st.text(max_size=30)),
    n=st.one_of(st.none(), st.integers(-5, 200).map(str), st.text(max_size=8)),
    ttl=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8)),
)
def test_any_query_gets_an_answer_never_a_500(
    http: tuple[FlaskClient, SessionFactory], project: str | None, annotator: str | None, n: str | None, ttl: str | None
) -> None:
    client, factory = http
    with factory() as s:
        exists = s.scalar(select(Project.id).where(Project.name == "nerves")) is not None
    if not exists:  # once per test: hypothesis runs every example on the same function-scoped database
        make_pool(factory, 3, name="nerves")
    params = {
        k: v for k, v in {"project": project, "annotator": annotator, "n": n, "ttl": ttl}.items() if v is not None
    }
    response = client.get("/api/next", query_string=params, headers=_auth())
    assert response.status_code in (200, 400, 404), (params, response.json)
    assert response.json is not None
    if response.status_code != 200:
        assert response.json["error"]

"""When a run is due, single-flight, the outbox and the reaper: policy and database rules, on
SQLite and (when configured) PostgreSQL. No training here (tests/test_retrain_run.py trains)."""

from __future__ import annotations

import datetime as dt

import numpy as np
from sqlalchemy import select

from backend.db.base import utcnow
from backend.db.models import Image, Project, TrainingRun
from backend.db.session import SessionFactory, unit_of_work
from backend.services.images import SourceInfo, add_image
from backend.services.masks import add_mask_version, deactivate_annotation
from backend.services.training import plan, policy, queue, requests
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.models import record_version

S = dt.timedelta(seconds=1)


def _label(session, store, project: Project, image: Image, value: int, ann: int | None = None) -> int:  # type: ignore[no-untyped-def]
    mask = np.zeros((image.height, image.width), np.uint8)
    mask[2 : 2 + value, 2:6] = 1
    return add_mask_version(
        session, store, project, image, mask, source="annotation", ls_annotation_id=ann
    ).mask_version.id


def _project(
    factory: SessionFactory,
    store: LocalBlobStore,
    n_train: int,
    n_val: int = 0,
    *,
    labelled: bool = True,
    **overrides: object,
) -> int:
    """A project with n_train training and n_val validation images (labelled unless told not to)."""
    with unit_of_work(factory) as s:
        p = Project(name="p", class_names=["Nerve"], **overrides)
        s.add(p)
        s.flush()
        for i in range(n_train + n_val):
            pixels = np.full((16, 16), i + 1, np.uint8)
            image = add_image(s, store, p, pixels, subject=f"s{i}", source=SourceInfo("import")).image
            image.split = "train" if i < n_train else "val"
            s.flush()
            if labelled:
                _label(s, store, p, image, 1, ann=1000 + i)
        return p.id


def _images(factory: SessionFactory, pid: int, split: str) -> list[int]:
    with factory() as s:
        return list(s.scalars(select(Image.id).where(Image.project_id == pid, Image.split == split).order_by(Image.id)))


def _register_version(factory: SessionFactory, pid: int, *, serve: bool = True) -> int:
    """A model version whose snapshot is the current training labels (as a run would record),
    serving or left a candidate."""
    with unit_of_work(factory) as s:
        plan_masks = plan.labelled_images(s, pid, "train")
        from backend.db.models import MaskVersion

        masks = list(s.scalars(select(MaskVersion).where(MaskVersion.id.in_([m.mask_version_id for m in plan_masks]))))
        return record_version(s, s.get_one(Project, pid), serve=serve, training_masks=masks).id


# -- pure policy --------------------------------------------------------------------------------
def test_count_changes_counts_new_changed_and_removed_images() -> None:
    assert policy.count_changes({1: 10, 2: 20}, {1: 10, 2: 20}) == 0
    assert policy.count_changes({1: 10, 2: 21, 3: 30}, {1: 10, 2: 20, 4: 40}) == 3  # changed 2, new 3, gone 4
    assert policy.count_changes({}, {}) == 0


def test_retrain_due_threshold_and_switches() -> None:
    rules = policy.RetrainPolicy(retrain_after=20, debounce_seconds=60, max_minutes=30, auto=True)
    assert not policy.retrain_due(19, rules)
    assert policy.retrain_due(20, rules)
    assert not policy.retrain_due(99, policy.RetrainPolicy(20, 60, 30, auto=False))
    assert not policy.retrain_due(99, policy.RetrainPolicy(0, 60, 30, auto=True))


def test_debounce_extends_but_is_capped() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert policy.debounce_until(t0, t0, 60) == t0 + 60 * S
    assert policy.debounce_until(t0 + 100 * S, t0, 60) == t0 + 160 * S
    assert policy.debounce_until(t0 + 1000 * S, t0, 60) == t0 + 300 * S  # 5 periods after queueing


def test_project_overrides_win_over_settings(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings
) -> None:
    pid = _project(factory, store, 0, retrain_after=3, train_max_minutes=2.5)
    with factory() as s:
        rules = policy.policy_for(s.get_one(Project, pid), settings.replace(retrain_after=20, train_max_minutes=30))
    assert (rules.retrain_after, rules.max_minutes, rules.auto) == (3, 2.5, True)


# -- what changed ---------------------------------------------------------------------------------
def test_changes_are_counted_against_the_last_trained_snapshot(factory: SessionFactory, store: LocalBlobStore) -> None:
    pid = _project(factory, store, 5, 2)

    def sql_and_reference() -> tuple[int, int]:
        with factory() as s:
            project = s.get_one(Project, pid)
            last = requests.last_trained_version(s, pid)
            reference = policy.count_changes(
                requests.current_labels(s, pid, "train"), requests.training_snapshot(last) if last else {}
            )
            return requests.changed_since_last_version(s, project), reference

    assert sql_and_reference() == (5, 5)  # no model yet: every training label counts, val never does
    _register_version(factory, pid)
    assert sql_and_reference() == (0, 0)
    train_ids, val_ids = _images(factory, pid, "train"), _images(factory, pid, "val")
    with unit_of_work(factory) as s:
        p = s.get_one(Project, pid)
        _label(s, store, p, s.get_one(Image, train_ids[0]), 3, ann=1000)  # a correction
        for image_id in val_ids:
            _label(s, store, p, s.get_one(Image, image_id), 4)  # held out: does not count
        deactivate_annotation(s, 1001)  # label of train image 1 deleted in Label Studio
    assert sql_and_reference() == (2, 2)
    with unit_of_work(factory) as s:
        _label(s, store, s.get_one(Project, pid), s.get_one(Image, train_ids[0]), 5, ann=1000)  # corrected twice
    assert sql_and_reference() == (2, 2)
    _register_version(factory, pid, serve=False)  # a rejected candidate is the new baseline
    assert sql_and_reference() == (0, 0)


# -- requesting runs --------------------------------------------------------------------------------
def test_threshold_queues_one_debounced_run_and_bursts_extend_it(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings
) -> None:
    settings = settings.replace(retrain_after=4, retrain_debounce_seconds=60)
    pid = _project(factory, store, 3)
    t0 = utcnow()
    with unit_of_work(factory) as s:
        assert requests.maybe_request_retrain(s, s.get_one(Project, pid), settings, now=t0) is None  # 3 < 4
    with unit_of_work(factory) as s:
        p = s.get_one(Project, pid)
        image = add_image(s, store, p, np.full((16, 16), 99, np.uint8), subject="x", source=SourceInfo("import")).image
        image.split = "train"
        _label(s, store, p, image, 1)
        run = requests.maybe_request_retrain(s, p, settings, now=t0)
        assert run is not None and run.trigger == "annotations" and run.status == "queued"
        assert run.not_before == t0 + 60 * S and run.progress["changed_labels"] == 4
        run_id = run.id
    for later in (10, 100, 1000):  # more saves while it waits
        with unit_of_work(factory) as s:
            assert requests.maybe_request_retrain(s, s.get_one(Project, pid), settings, now=t0 + later * S) is None
    with factory() as s:
        runs = list(s.scalars(select(TrainingRun)))
        assert [r.id for r in runs] == [run_id]
        created = runs[0].created_at
        assert runs[0].not_before == min(t0 + 1060 * S, created + 300 * S)
        assert not s.get_one(Project, pid).retrain_pending


def test_running_run_is_left_alone_and_auto_off_never_triggers(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings
) -> None:
    settings = settings.replace(retrain_after=2)
    pid = _project(factory, store, 3)
    with unit_of_work(factory) as s:
        run = requests.maybe_request_retrain(s, s.get_one(Project, pid), settings)
        assert run is not None
        run_id = run.id
    with unit_of_work(factory) as s:
        assert queue.claim_run(s, run_id, worker="w", task_id="t", now=utcnow() + 3600 * S) is not None
    with unit_of_work(factory) as s:
        p = s.get_one(Project, pid)
        assert requests.maybe_request_retrain(s, p, settings) is None
        assert not p.retrain_pending  # the count is taken again when the run ends
    manual_pid = _project(factory, store, 5, auto_retrain=False)
    with unit_of_work(factory) as s:
        p = s.get_one(Project, manual_pid)
        assert requests.maybe_request_retrain(s, p, settings) is None
        assert requests.request_scheduled(s, p, settings) is None
        assert requests.request_training(s, p, "manual") is not None  # by hand still works


def test_second_trigger_while_active_marks_pending_and_finish_starts_one_more(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings
) -> None:
    pid = _project(factory, store, 2)
    with unit_of_work(factory) as s:
        first = requests.request_training(s, s.get_one(Project, pid), "start_training")
        assert first is not None and first.not_before is not None
        first_id = first.id
    with unit_of_work(factory) as s:
        p = s.get_one(Project, pid)
        assert requests.request_training(s, p, "manual", from_scratch=True) is None
        assert p.retrain_pending
    with unit_of_work(factory) as s:
        claimed = queue.claim_run(s, first_id, worker="w", task_id="t")
        assert claimed is not None
    with unit_of_work(factory) as s:
        run = queue.owned_run(s, claimed)
        assert run is not None
        follow_up = queue.finish_run(s, run, "failed", error="boom", settings=settings)
        assert follow_up is not None and follow_up.trigger == "manual" and follow_up.status == "queued"
        assert follow_up.progress["follow_up_of"] == first_id
        assert not s.get_one(Project, pid).retrain_pending
    with factory() as s:
        first_row = s.get_one(TrainingRun, first_id)
        assert (first_row.status, first_row.error) == ("failed", "boom")


def test_schedule_runs_only_if_something_changed(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings
) -> None:
    pid = _project(factory, store, 2)
    _register_version(factory, pid)
    with unit_of_work(factory) as s:
        assert requests.request_scheduled(s, s.get_one(Project, pid), settings) is None
    first_image = _images(factory, pid, "train")[0]
    with unit_of_work(factory) as s:
        p = s.get_one(Project, pid)
        _label(s, store, p, s.get_one(Image, first_image), 6)
        run = requests.request_scheduled(s, p, settings)
        assert run is not None and run.trigger == "schedule"


# -- claim, outbox, reaper --------------------------------------------------------------------------
def test_claim_is_a_compare_and_set(factory: SessionFactory, store: LocalBlobStore) -> None:
    pid = _project(factory, store, 1)
    t0 = utcnow()
    with unit_of_work(factory) as s:
        run = requests.request_training(s, s.get_one(Project, pid), "manual", now=t0 + 30 * S)
        assert run is not None
        run_id = run.id
    with unit_of_work(factory) as s:
        assert queue.claim_run(s, run_id, worker="w1", task_id="a", now=t0) is None  # not due yet
    with unit_of_work(factory) as s:
        claimed = queue.claim_run(s, run_id, worker="w1", task_id="a", now=t0 + 31 * S)
    with unit_of_work(factory) as s:
        assert queue.claim_run(s, run_id, worker="w2", task_id="b", now=t0 + 32 * S) is None  # duplicate message
        assert queue.claim_run(s, 999_999, worker="w2", task_id="c") is None
    assert claimed is not None and claimed.attempt == 1 and claimed.project_id == pid
    with factory() as s:
        row = s.get_one(TrainingRun, run_id)
        assert (row.status, row.worker, row.celery_task_id, row.attempts) == ("running", "w1", "a", 1)


def test_outbox_sends_due_runs_and_resends_lost_messages(factory: SessionFactory, store: LocalBlobStore) -> None:
    a, b = _project(factory, store, 1), _project(factory, store, 1)
    t0 = utcnow()
    with unit_of_work(factory) as s:
        due = requests.request_training(s, s.get_one(Project, a), "manual", now=t0)
        later = requests.request_training(s, s.get_one(Project, b), "manual", now=t0 + 60 * S)
        assert due is not None and later is not None
        due_id, later_id = due.id, later.id
    with unit_of_work(factory) as s:
        assert queue.runs_to_dispatch(s, now=t0, redispatch_after_seconds=300) == [due_id]
        queue.mark_dispatched(s, due_id, now=t0)
    with unit_of_work(factory) as s:
        assert queue.runs_to_dispatch(s, now=t0 + 10 * S, redispatch_after_seconds=300) == []
        assert queue.runs_to_dispatch(s, now=t0 + 301 * S, redispatch_after_seconds=300) == [due_id, later_id]
        assert queue.claim_run(s, due_id, worker="w", task_id=None, now=t0 + 302 * S) is not None
    with unit_of_work(factory) as s:
        assert queue.runs_to_dispatch(s, now=t0 + 400 * S, redispatch_after_seconds=300) == [later_id]


def test_reaper_requeues_then_fails_runs_whose_worker_died(factory: SessionFactory, store: LocalBlobStore) -> None:
    pid = _project(factory, store, 1)
    t0 = utcnow()
    with unit_of_work(factory) as s:
        run = requests.request_training(s, s.get_one(Project, pid), "manual", now=t0)
        assert run is not None
        run_id = run.id
    with unit_of_work(factory) as s:
        first = queue.claim_run(s, run_id, worker="dead-1", task_id="a", now=t0)
    with unit_of_work(factory) as s:
        assert queue.reap_stale_runs(s, now=t0 + 100 * S, stale_after_seconds=120, max_attempts=2) == []
        reaped = queue.reap_stale_runs(s, now=t0 + 121 * S, stale_after_seconds=120, max_attempts=2)
    assert [(r.run_id, r.requeued) for r in reaped] == [(run_id, True)]
    with factory() as s:
        row = s.get_one(TrainingRun, run_id)
        assert row.status == "queued" and row.dispatched_at is None and "lost its worker dead-1" in (row.error or "")
    assert first is not None
    with unit_of_work(factory) as s:
        assert queue.owned_run(s, first) is None  # the old attempt can no longer register anything
        second = queue.claim_run(s, run_id, worker="dead-2", task_id="b", now=t0 + 122 * S)
        assert second is not None and second.attempt == 2
    with unit_of_work(factory) as s:
        reaped = queue.reap_stale_runs(s, now=t0 + 400 * S, stale_after_seconds=120, max_attempts=2)
    assert [(r.run_id, r.requeued) for r in reaped] == [(run_id, False)]
    with factory() as s:
        row = s.get_one(TrainingRun, run_id)
        assert row.status == "failed" and "giving up after 2 attempt(s)" in (row.error or "")
        assert row.finished_at is not None


def test_heartbeat_notices_a_lost_claim(factory: SessionFactory, store: LocalBlobStore) -> None:
    pid = _project(factory, store, 1)
    with unit_of_work(factory) as s:
        run = requests.request_training(s, s.get_one(Project, pid), "manual")
        assert run is not None
        run_id = run.id
    with unit_of_work(factory) as s:
        claimed = queue.claim_run(s, run_id, worker="w", task_id=None)
    assert claimed is not None
    heartbeat = queue.Heartbeat(factory, claimed, interval_seconds=60)
    heartbeat.report(phase="training", epoch=3)
    assert heartbeat.beat() and not heartbeat.lost()
    with factory() as s:
        assert s.get_one(TrainingRun, run_id).progress["epoch"] == 3
    with unit_of_work(factory) as s:
        queue.reap_stale_runs(s, now=utcnow() + 3600 * S, stale_after_seconds=1, max_attempts=5)
    assert not heartbeat.beat() and heartbeat.lost()

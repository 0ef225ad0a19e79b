"""Executing training runs in-process with a tiny network: registration, the gate, rollback and
the failure paths (no orphan checkpoint, lost claims, CUDA out-of-memory fallback)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from backend.db.models import Image, ModelVersion, Project, TrainingRun
from backend.db.session import SessionFactory, unit_of_work
from backend.services.images import SourceInfo, add_image
from backend.services.masks import add_mask_version
from backend.services.status import collect_status
from backend.services.training import execute, plan, queue, requests
from backend.services.versions import serving_version
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.models import WORKER_TINY, tiny_spec

TINY = "test_tiny"


@pytest.fixture(autouse=True)
def tiny_preset() -> Iterator[None]:
    from backend.model.spec import PRESETS

    PRESETS[TINY] = lambda classes: tiny_spec(classes, **WORKER_TINY)  # a training step takes milliseconds
    yield
    PRESETS.pop(TINY, None)


@pytest.fixture
def run_settings(settings: Settings) -> Settings:
    return settings.replace(
        model_preset=TINY, train_max_minutes=0.04, train_heartbeat_seconds=0.2, device="cpu", retrain_after=1000
    )


def _project(factory: SessionFactory, store: LocalBlobStore, n_train: int = 5, n_val: int = 2) -> int:
    from backend.model.synthetic import make_blob_pairs

    pairs = make_blob_pairs(n_train + n_val, size=(128, 128), n_foreground=2, seed=7)
    with unit_of_work(factory) as s:
        p = Project(name="nerves", class_names=["Nerve", "Vessel"])
        s.add(p)
        s.flush()
        for i, (pixels, mask) in enumerate(pairs):
            image = add_image(s, store, p, pixels, subject=f"s{i}", source=SourceInfo("import")).image
            image.split = "train" if i < n_train else "val"
            s.flush()
            add_mask_version(s, store, p, image, mask.astype(np.uint8), source="import")
        return p.id


def _run(factory: SessionFactory, store: LocalBlobStore, settings: Settings, pid: int, **kw: Any) -> execute.RunOutcome:
    with unit_of_work(factory) as s:
        run = requests.request_training(s, s.get_one(Project, pid), "manual")
        assert run is not None
        run_id = run.id
    with unit_of_work(factory) as s:
        claimed = queue.claim_run(s, run_id, worker="test", task_id=None)
    assert claimed is not None
    return execute.execute_run(factory, store, settings, claimed, **kw)


def _checkpoint_files(store: LocalBlobStore) -> set[str]:
    root = store.root / "checkpoints"
    return {str(p.relative_to(store.root)) for p in root.rglob("*.safetensors")} if root.exists() else set()


def test_a_run_registers_an_immutable_version_with_its_snapshot_and_serves_it(
    factory: SessionFactory, store: LocalBlobStore, run_settings: Settings
) -> None:
    pid = _project(factory, store)
    progress: list[dict[str, Any]] = []
    outcome = _run(factory, store, run_settings, pid, on_progress=progress.append)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.promoted and "first model" in (outcome.gate_reason or "")
    assert {"loading", "training", "evaluating", "registering"} <= {p["phase"] for p in progress}
    assert any("epoch" in p and "loss" in p for p in progress)
    with factory() as s:
        version = serving_version(s, pid)
        assert version is not None and version.uid == outcome.model_version_uid
        assert {mv.id for mv in version.training_masks} == set(requests.current_labels(s, pid, "train").values())
        assert len(version.training_masks) == 5
        assert version.metrics["n_val"] == 2 and 0.0 <= version.metrics["fg_mDice"] <= 1.0
        assert set(version.metrics["val_report"]["per_class"]) == {"Nerve", "Vessel"}
        key = version.checkpoint_key or ""
        assert store.verify(key) and key.endswith(f"{version.checkpoint_sha256}.safetensors")
        run = s.scalars(select(TrainingRun)).one()
        assert (run.status, run.device, run.model_version_id, run.error) == ("succeeded", "cpu", version.id, None)
        assert run.progress["phase"] == "succeeded" and run.progress["epoch"] >= 1
    assert _checkpoint_files(store) == {version.checkpoint_key}
    assert not list(execute.run_dirs_root(run_settings).iterdir())


def test_a_worse_candidate_is_not_promoted_and_rollback_restores_the_previous_version(
    factory: SessionFactory, store: LocalBlobStore, run_settings: Settings, db_url: str
) -> None:
    from cli.main import cli

    pid = _project(factory, store)
    first = _run(factory, store, run_settings, pid)
    assert first.promoted
    # A margin of +1 Dice makes every candidate "worse" than the serving model, deterministically.
    worse = _run(factory, store, run_settings.replace(gate_margin=1.0), pid)
    assert worse.status == "succeeded" and not worse.promoted
    with factory() as s:
        kept = s.scalars(select(ModelVersion).where(ModelVersion.uid == worse.model_version_uid)).one()
        assert kept.status == "candidate" and "kept as a candidate" in (kept.gate_reason or "")
        assert kept.metrics["fine_tuned_from"] == first.model_version_uid
        assert kept.parent_id == serving_version(s, pid).id  # type: ignore[union-attr]
        assert serving_version(s, pid).uid == first.model_version_uid  # type: ignore[union-attr]
    better = _run(factory, store, run_settings.replace(gate_margin=-1.0), pid)
    assert better.promoted
    env = {"SONOSEG_DATA_DIR": str(run_settings.data_dir), "SONOSEG_DATABASE_URL": db_url}
    result = CliRunner().invoke(cli, ["models", "rollback", "--project", str(pid)], env=env)
    assert result.exit_code == 0, result.output
    assert first.model_version_uid in result.output
    with factory() as s:
        statuses = {v.uid: v.status for v in s.scalars(select(ModelVersion))}
    assert statuses == {
        first.model_version_uid: "serving",
        worse.model_version_uid: "candidate",
        better.model_version_uid: "retired",
    }


def test_a_failure_after_the_checkpoint_was_stored_leaves_no_orphan(
    factory: SessionFactory, store: LocalBlobStore, run_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = _project(factory, store)

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(execute, "evaluate_checkpoint", broken)
    outcome = _run(factory, store, run_settings, pid)
    assert outcome.status == "failed" and outcome.error == "RuntimeError: evaluation exploded"
    with factory() as s:
        assert s.scalars(select(ModelVersion)).all() == []
        run = s.scalars(select(TrainingRun)).one()
        assert run.status == "failed" and run.error == "RuntimeError: evaluation exploded"
    assert _checkpoint_files(store) == set()
    status = collect_status(factory.kw["bind"], store)
    assert status["projects"][0]["runs"][0]["error"] == "RuntimeError: evaluation exploded"


def test_no_training_labels_fails_with_a_clear_error(
    factory: SessionFactory, store: LocalBlobStore, run_settings: Settings
) -> None:
    pid = _project(factory, store, n_train=0, n_val=2)
    outcome = _run(factory, store, run_settings, pid)
    assert outcome.status == "failed" and "no labelled training image" in (outcome.error or "")


def test_a_run_whose_claim_was_lost_registers_nothing(
    factory: SessionFactory, store: LocalBlobStore, run_settings: Settings
) -> None:
    pid = _project(factory, store)
    requeued: list[int] = []

    def reaper_strikes(progress: dict[str, Any]) -> None:
        if progress.get("phase") == "training" and not requeued:
            with unit_of_work(factory) as s:  # what the reaper does when it thinks the worker died
                run = s.scalars(select(TrainingRun)).one()
                run.status, run.celery_task_id = "queued", None
                requeued.append(run.id)

    outcome = _run(factory, store, run_settings.replace(train_max_minutes=0.1), pid, on_progress=reaper_strikes)
    assert requeued and outcome.status == "lost"
    with factory() as s:
        assert s.scalars(select(ModelVersion)).all() == []
        assert s.get_one(TrainingRun, requeued[0]).status == "queued"  # left to the next attempt
    assert _checkpoint_files(store) == set()


def test_cuda_out_of_memory_retries_with_a_smaller_batch(
    factory: SessionFactory, store: LocalBlobStore, run_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import backend.model.train as engine

    real_train = engine.train
    batches: list[int] = []

    def oom_above_four(config: Any, data: Any, **kw: Any) -> Any:
        batches.append(config.batch_size)
        if config.batch_size > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train(config, data, **kw)

    monkeypatch.setattr(engine, "train", oom_above_four)
    pid = _project(factory, store)
    outcome = _run(factory, store, run_settings, pid)
    assert outcome.status == "succeeded", outcome.error
    assert batches == [12, 6, 3]
    with factory() as s:
        assert serving_version(s, pid).metrics["batch_size"] == 3  # type: ignore[union-attr]


def test_other_runtime_errors_are_not_retried(
    factory: SessionFactory, store: LocalBlobStore, run_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import backend.model.train as engine

    calls: list[int] = []

    def broken(config: Any, data: Any, **kw: Any) -> Any:
        calls.append(config.batch_size)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(engine, "train", broken)
    outcome = _run(factory, store, run_settings, _project(factory, store))
    assert outcome.status == "failed" and calls == [12]


def test_images_are_read_from_the_snapshot(factory: SessionFactory, store: LocalBlobStore) -> None:
    pid = _project(factory, store, n_train=2, n_val=1)
    with factory() as s:
        items = plan.labelled_images(s, pid, "train")
        image_ids = set(s.scalars(select(Image.id).where(Image.split == "train")))
    pairs = plan.load_pairs(store, items)
    assert {i.image_id for i in items} == image_ids
    assert all(img.shape == (128, 128) and img.dtype == np.uint8 and mask.max() <= 2 for img, mask in pairs)


def test_sweep_removes_scratch_dirs_of_dead_runs(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    root = execute.run_dirs_root(settings)
    for name in ("run-1-aaaa", "run-2-bbbb", "unrelated"):
        (root / name).mkdir(parents=True)
    removed = execute.sweep_run_dirs(settings, running_run_ids={2})
    assert [p.name for p in removed] == ["run-1-aaaa"]
    assert sorted(p.name for p in root.iterdir()) == ["run-2-bbbb", "unrelated"]


def test_cli_policy_inline_training_and_evaluation(
    factory: SessionFactory, store: LocalBlobStore, run_settings: Settings, db_url: str
) -> None:
    from cli.main import cli

    pid = _project(factory, store)
    env = {
        "SONOSEG_DATA_DIR": str(run_settings.data_dir),
        "SONOSEG_DATABASE_URL": db_url,
        "SONOSEG_MODEL_PRESET": TINY,
        "SONOSEG_TRAIN_MAX_MINUTES": "0.04",
        "SONOSEG_DEVICE": "cpu",
    }
    runner = CliRunner()
    policy = runner.invoke(
        cli, ["retrain-policy", "--project", "nerves", "--after", "3", "--max-minutes", "0.1", "--no-auto"], env=env
    )
    assert policy.exit_code == 0, policy.output
    assert "auto=False retrain_after=3" in policy.output and "changed_training_labels=5" in policy.output
    trained = runner.invoke(cli, ["train", "--project", "nerves", "--inline"], env=env)
    assert trained.exit_code == 0, trained.output
    assert "succeeded on cpu" in trained.output and "is serving" in trained.output
    evaluated = runner.invoke(cli, ["evaluate", "--project", "nerves", "--json"], env=env)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output)
    assert report["split"] == "val" and report["n_images"] == 2 and 0 <= report["fg_mDice"] <= 1
    with factory() as s:
        project = s.get_one(Project, pid)
        version = serving_version(s, pid)
        assert (project.retrain_after, project.train_max_minutes, project.auto_retrain) == (3, 0.1, False)
        assert version is not None and report["version"] == version.uid
        assert report["fg_mDice"] == pytest.approx(version.metrics["fg_mDice"])  # same labels, same model
    none_on_test = runner.invoke(cli, ["evaluate", "--project", "nerves", "--split", "test"], env=env)
    assert none_on_test.exit_code == 1 and "no labelled test image" in none_on_test.output


def test_a_first_model_below_the_floor_stays_a_candidate_with_the_reason(
    factory: SessionFactory, store: LocalBlobStore, run_settings: Settings
) -> None:
    """A first model once served after 0 epochs ("no serving model to compare with"): the first
    promotion has a floor now (here set out of reach, so the run must not promote)."""
    pid = _project(factory, store)
    outcome = _run(factory, store, run_settings.replace(gate_min_dice=1.0), pid)
    assert outcome.status == "succeeded" and not outcome.promoted
    assert "first model not promoted" in (outcome.gate_reason or "") and "below the floor" in (
        outcome.gate_reason or ""
    )
    with factory() as s:
        assert serving_version(s, pid) is None
        (version,) = s.scalars(select(ModelVersion)).all()
        assert version.status == "candidate" and "floor" in (version.gate_reason or "")

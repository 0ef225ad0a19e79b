"""``sonoseg models register``: an offline checkpoint becomes a candidate version, through the gate."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from backend.db.models import Image, ModelVersion, Project, ServingChange
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import CheckpointError, InvalidInput, NotFound
from backend.services.images import SourceInfo, add_image
from backend.services.masks import add_mask_version
from backend.services.offline_models import register_checkpoint
from backend.services.projects import get_or_create_project
from backend.services.versions import serving_version
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from cli.main import cli
from tests.support.frames import synthetic_frame
from tests.support.models import save_tiny_checkpoint, tiny_spec

CLASSES = ("Nerve", "Vessel")
# The registration tests run on SQLite only: ``db_url`` is ``sqlite_url`` alone, marked ``sqlite``.
sqlite_only = pytest.mark.parametrize("db_url", [pytest.param("sqlite_url", marks=pytest.mark.sqlite)], indirect=True)


def _checkpoint(path: Path, classes: tuple[str, ...] = CLASSES) -> Path:
    """An untrained tiny network for ``classes`` (in that order), saved at ``path``."""
    save_tiny_checkpoint(path, classes, spec=tiny_spec(classes))
    return path


def _project(factory: SessionFactory, store: LocalBlobStore, *, val_images: int = 2) -> int:
    """A project with ``val_images`` labelled validation frames (and one training frame)."""
    with unit_of_work(factory) as session:
        project = get_or_create_project(session, "offline", class_names=CLASSES)
        for i in range(val_images + 1):
            img, mask = synthetic_frame(i, (64, 64))
            added = add_image(session, store, project, img, subject=f"s{i}", source=SourceInfo("import", ref=f"r{i}"))
            added.image.split = "val" if i < val_images else "train"
            add_mask_version(session, store, project, added.image, mask, source="import", author="import")
        return project.id


@pytest.fixture
def pid(factory: SessionFactory, store: LocalBlobStore) -> int:
    """The id of a project with two labelled validation frames (:func:`_project`)."""
    return _project(factory, store)


@sqlite_only
def test_a_matching_checkpoint_is_scored_and_registered_as_a_candidate(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings, pid: int, tmp_path: Path
) -> None:
    done = register_checkpoint(factory, store, settings, pid, _checkpoint(tmp_path / "offline.safetensors"))
    with unit_of_work(factory) as session:
        version = session.scalars(select(ModelVersion).where(ModelVersion.uid == done.uid)).one()
        assert version.status == "candidate" and version.checkpoint_sha256 and version.checkpoint_key
        assert store.exists(version.checkpoint_key)
        assert version.metrics["n_val"] == 2 and "fg_mDice" in version.metrics and version.metrics["offline"]
        assert version.gate_reason and version.gate_reason.startswith("registered offline; gate:")
        assert serving_version(session, pid) is None  # registering never serves by itself
    assert done.n_val == 2 and not done.promoted


@sqlite_only
def test_promote_if_better_goes_through_the_gate(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings, pid: int, tmp_path: Path
) -> None:
    path = _checkpoint(tmp_path / "offline.safetensors")
    strict = settings.replace(gate_min_dice=1.0)  # no untrained network segments perfectly
    refused = register_checkpoint(factory, store, strict, pid, path, promote_if_better=True)
    assert not refused.promoted and "below the floor" in refused.decision.reason
    lenient = settings.replace(gate_min_dice=0.0)
    accepted = register_checkpoint(factory, store, lenient, pid, path, promote_if_better=True)
    assert accepted.promoted
    with unit_of_work(factory) as session:
        serving = serving_version(session, pid)
        assert serving is not None and serving.uid == accepted.uid
        change = session.scalars(select(ServingChange).where(ServingChange.model_version_id == serving.id)).one()
        assert change.kind == "promote" and "gate (offline checkpoint)" in (change.reason or "")


@sqlite_only
def test_a_checkpoint_with_other_classes_or_damage_is_refused_and_stores_nothing(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings, pid: int, tmp_path: Path
) -> None:
    # the same names, another order: other class indices
    other = _checkpoint(tmp_path / "other.safetensors", ("Vessel", "Nerve"))
    with pytest.raises(InvalidInput, match="not the project's"):
        register_checkpoint(factory, store, settings, pid, other)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(other.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        register_checkpoint(factory, store, settings, pid, damaged)
    with pytest.raises(NotFound):
        register_checkpoint(factory, store, settings, pid, tmp_path / "missing.safetensors")
    with unit_of_work(factory) as session:
        assert session.scalars(select(ModelVersion)).all() == []
    assert [p for p in settings.store_dir.rglob("*.safetensors")] == []  # nothing stored for a refused file


def test_models_register_on_the_command_line(tmp_path: Path) -> None:
    env = {"SONOSEG_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "upgrade"], env=env).exit_code == 0
    settings = Settings.from_env(env)
    from backend.runtime import Runtime

    runtime = Runtime.from_settings(settings)
    _project(runtime.factory, runtime.store, val_images=1)
    path = _checkpoint(tmp_path / "m.safetensors")
    ok = runner.invoke(cli, ["models", "register", str(path), "--project", "offline", "--json"], env=env)
    assert ok.exit_code == 0, ok.output
    assert '"promoted": false' in ok.output and '"n_val": 1' in ok.output
    wrong = _checkpoint(tmp_path / "w.safetensors", ("Nerve",))
    bad = runner.invoke(cli, ["models", "register", str(wrong), "--project", "offline"], env=env)
    assert bad.exit_code != 0 and "not the project's" in bad.output
    with unit_of_work(runtime.factory) as session:
        assert len(session.scalars(select(ModelVersion)).all()) == 1
        assert session.scalars(select(Project.name)).all() == ["offline"]
        assert len(session.scalars(select(Image.id)).all()) == 2
    runtime.close()

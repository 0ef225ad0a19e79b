"""Reconciliation: pull a project's annotations from Label Studio and repair what webhooks missed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from backend.db.models import ImageSource, MaskVersion
from backend.db.session import SessionFactory, unit_of_work
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.labelstudio.images import TaskImageFetcher
from backend.services.annotations import apply_annotation
from backend.services.masks import read_mask
from backend.services.reconciliation import reconcile_project
from backend.services.sync import ImageLimits, LabelStudioMirror
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.fake_labelstudio import LEGACY_TOKEN, FakeLabelStudio
from tests.support.frames import dataset_pairs, png_bytes
from tests.support.payloads import annotation
from tests.support.servers import ServedApp


@dataclass
class World:
    ls: FakeLabelStudio
    url: str
    mirror: LabelStudioMirror
    masks: list[np.ndarray]

    def labels(self) -> dict[int, tuple[bool, bool]]:
        """ls_annotation_id -> (active, current) of its newest version."""
        with unit_of_work(self.mirror.factory) as session:
            rows = session.scalars(
                select(MaskVersion).where(MaskVersion.source == "annotation").order_by(MaskVersion.id)
            )
            return {mv.ls_annotation_id: (mv.active, mv.is_current) for mv in rows if mv.ls_annotation_id is not None}


@pytest.fixture
def world(settings: Settings, factory: SessionFactory, store: LocalBlobStore) -> Iterator[World]:
    ls = FakeLabelStudio()
    served = ServedApp(ls.app())
    pairs = dataset_pairs(3)
    ls.projects[4] = {"id": 4, "title": "Brachial plexus", "label_config": DEFAULT_LABEL_CONFIG}
    for i, (name, img, _) in enumerate(pairs, start=1):
        ls.files[f"/data/upload/4/{name}"] = png_bytes(img)
        ls.tasks[i] = {"id": i, "project": 4, "data": {"image": f"/data/upload/4/{name}"}, "annotations": []}
    fetcher = TaskImageFetcher(settings, LabelStudioClient(served.url, LEGACY_TOKEN))
    yield World(
        ls,
        served.url,
        LabelStudioMirror(
            factory, store, fetcher, limits=ImageLimits.from_settings(settings), key_dir=settings.data_dir
        ),
        [m for _, _, m in pairs],
    )
    served.close()


def test_reconcile_records_missed_changed_and_gone_annotations(world: World) -> None:
    ls, mirror, masks = world.ls, world.mirror, world.masks
    # What webhooks told us earlier: annotation 11 (an older drawing) and 13 (since deleted in LS).
    with unit_of_work(mirror.factory) as session:
        project, config = mirror.ensure_project(session, 4, DEFAULT_LABEL_CONFIG)
        project_id = project.id
    old = masks[0].copy()
    old[old == 2] = 0
    for ann_id, task_id, mask in ((11, 1, old), (13, 3, masks[2])):
        image = mirror.task_image(project_id, task_id, ls.tasks[task_id]["data"]["image"])
        with unit_of_work(mirror.factory) as session:
            from backend.db.models import Project
            from backend.labelstudio.payloads import LsAnnotation

            apply_annotation(
                session,
                mirror.store,
                session.get_one(Project, project_id),
                config,
                image.image_id,
                LsAnnotation.parse(annotation(ann_id, task_id, mask)),
            )
    downloads = sum(1 for s in ls.seen if s.path.startswith("/data/upload/"))
    # Label Studio now: 11 was corrected, 12 is new (missed webhook), 14 is a skip, 13 is gone.
    ls.tasks[1]["annotations"] = [annotation(11, 1, masks[0])]
    ls.tasks[2]["annotations"] = [annotation(12, 2, masks[1]), annotation(14, 2, None, cancelled=True)]

    report = reconcile_project(mirror, 4)
    assert (report.tasks, report.annotations, report.created, report.updated, report.deactivated) == (3, 3, 1, 1, 1)
    assert report.errors == []
    assert world.labels() == {11: (True, True), 12: (True, True), 13: (False, False)}
    with unit_of_work(mirror.factory) as session:
        newest = session.scalars(
            select(MaskVersion).where(MaskVersion.ls_annotation_id == 11).order_by(MaskVersion.version.desc())
        ).first()
        assert newest is not None
        np.testing.assert_array_equal(read_mask(mirror.store, newest), masks[0])
    # Only task 2's image was new: stored images are not downloaded again.
    assert sum(1 for s in ls.seen if s.path.startswith("/data/upload/")) == downloads + 1

    again = reconcile_project(mirror, 4)  # idempotent
    assert (again.created, again.updated, again.deactivated, again.unchanged) == (0, 0, 0, 2)

    del ls.tasks[2]  # deleted in Label Studio
    gone = reconcile_project(mirror, 4)
    assert (gone.tasks_gone, gone.deactivated) == (1, 1)
    assert world.labels()[12] == (False, False)
    with unit_of_work(mirror.factory) as session:
        assert {s.ls_task_id: s.active for s in session.scalars(select(ImageSource))} == {1: True, 2: False, 3: True}


def test_a_bad_annotation_is_reported_and_the_rest_sync(world: World) -> None:
    ls = world.ls
    bad = annotation(21, 1, np.ones((10, 10), np.uint8))  # drawn on another size than the image
    ls.tasks[1]["annotations"] = [bad]
    ls.tasks[2]["annotations"] = [annotation(22, 2, world.masks[1])]
    ls.tasks[3]["data"]["image"] = "/data/upload/4/missing.png"
    ls.tasks[3]["annotations"] = [annotation(23, 3, world.masks[2])]
    report = reconcile_project(world.mirror, 4)
    assert report.created == 1 and len(report.errors) == 2
    assert any("annotation 21" in e and "brush regions must cover" in e for e in report.errors)
    assert any(e.startswith("task 3:") for e in report.errors)
    assert world.labels() == {22: (True, True)}


def test_sync_command(world: World, settings: Settings) -> None:
    from cli.main import cli

    world.ls.tasks[1]["annotations"] = [annotation(31, 1, world.masks[0])]
    env = {
        "SONOSEG_DATA_DIR": str(settings.data_dir),
        "SONOSEG_DATABASE_URL": settings.database_url,
        "LABEL_STUDIO_URL": world.url,
        "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
    }
    result = CliRunner().invoke(cli, ["sync", "--project", "4"], env=env)
    assert result.exit_code == 0, result.output
    assert "project 4: 3 tasks, 1 annotations: 1 created" in result.output
    assert LEGACY_TOKEN not in result.output
    result = CliRunner().invoke(cli, ["sync"], env=env)  # every project seen before
    assert result.exit_code == 0 and "0 created" in result.output


def test_sync_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    from cli.main import cli

    env = {"SONOSEG_DATA_DIR": str(tmp_path / "d"), "SONOSEG_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    for args in (["sync", "--project", "1"], ["serve"]):
        result = CliRunner().invoke(cli, args, env=env)
        assert result.exit_code != 0
        assert "sonoseg db upgrade" in result.output

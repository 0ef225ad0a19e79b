"""Silent damage to training data, kept out: arrival order, unknown labels, duplicates, re-imports,
and one reading of a task's subject on every path (real SQLite, and PostgreSQL in CI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import select

from backend.db.models import Image, ImageSource, LabelIssue, MaskVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.labelstudio.payloads import LsAnnotation, LsTask
from backend.services.label_issues import choose_version
from backend.services.masks import current_mask_version, read_mask
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.datasets import Importer, write_png
from tests.support.frames import synthetic_frame
from tests.support.payloads import annotation_event
from tests.test_webhooks import Hooks, hooks  # noqa: F401  (the fixture)


def _stamp(minute: int) -> str:
    return f"2026-11-25T10:{minute:02d}:00Z"


def _current(h: Hooks) -> MaskVersion | None:
    with unit_of_work(h.state.factory) as session:
        return session.scalars(select(MaskVersion).where(MaskVersion.is_current)).one_or_none()


# -- item 9: Label Studio's updated_at decides, not arrival order ----------------------------------------
def test_an_older_update_arriving_last_is_history_not_the_label(hooks: Hooks) -> None:  # noqa: F811
    older, newer = hooks.masks[0].copy(), hooks.masks[0].copy()
    older[older == 2] = 0
    hooks.post(annotation_event("ANNOTATION_UPDATED", 1, 10, hooks.urls[0], hooks.masks[0], updated_at=_stamp(30)))
    hooks.process()
    hooks.post(annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], older, updated_at=_stamp(10)))
    hooks.process()
    current = _current(hooks)
    assert current is not None
    np.testing.assert_array_equal(read_mask(hooks.state.store, current), newer)
    versions = hooks.versions()
    assert len(versions) == 2 and [v.is_current for v in versions] == [True, False]  # the late one is kept


@hsettings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(4)), replays=st.lists(st.integers(0, 3), max_size=3))
def test_whatever_the_arrival_order_the_newest_edit_is_current(
    hooks: Hooks,  # noqa: F811  (the fixture imported above)
    order: list[int],
    replays: list[int],
) -> None:
    """Four edits of one annotation (and of a second annotator's) delivered in any order, some twice."""
    task = 40 + len(hooks.versions())  # a fresh task per example: the fixture's database is shared
    anns = (1000 + task * 10, 1000 + task * 10 + 1)
    base = hooks.masks[1]
    edits = []
    for k in range(4):
        m = base.copy()
        m[: 8 * (k + 1), : 8 * (k + 1)] = 1
        edits.append(m)
    root = hooks.state.settings.local_files_root
    assert root is not None
    pixels = np.random.default_rng(task).integers(0, 255, base.shape, dtype=np.uint8)  # a new frame per example
    write_png(root / f"ex{task}.png", pixels)
    url = f"/data/local-files/?d=ex{task}.png"
    for k in [*order, *replays]:
        ann = anns[k % 2]  # two annotations of the same image
        hooks.post(annotation_event("ANNOTATION_UPDATED", ann, task, url, edits[k], updated_at=_stamp(k * 5)))
        hooks.process()
    with unit_of_work(hooks.state.factory) as session:
        source = session.scalars(select(ImageSource).where(ImageSource.ls_task_id == task)).one()
        image = session.get_one(Image, source.image_id)
        current = current_mask_version(session, image)
        assert current is not None and current.ls_annotation_id in anns
        np.testing.assert_array_equal(read_mask(hooks.state.store, current), edits[3])
        n = len(session.scalars(select(MaskVersion).where(MaskVersion.ls_annotation_id.in_(anns))).all())
    assert n == 4  # each edit once, replays add nothing


# -- item 10: every region with an unknown label is refused, with a reason ----------------------------------
def test_an_annotation_whose_labels_are_all_unknown_is_refused_with_a_reason(hooks: Hooks) -> None:  # noqa: F811
    event = annotation_event("ANNOTATION_CREATED", 5, 10, hooks.urls[0], hooks.masks[0])
    for region in event["annotation"]["result"]:
        region["value"]["brushlabels"] = ["Tendon"]
    hooks.post(event)
    report = hooks.process()
    assert (report.processed, report.failed) == (0, 1)
    assert hooks.versions() == []  # never an all-background label
    (row,) = hooks.events()
    assert row.status == "failed" and "Tendon" in (row.error or "") and "class map does not know" in (row.error or "")
    with unit_of_work(hooks.state.factory) as session:
        issue = session.scalars(select(LabelIssue)).one()
        assert (issue.kind, issue.status, issue.ls_annotation_id) == ("unknown_labels", "open", 5)
    from cli.main import cli

    out = CliRunner().invoke(cli, ["status"], env=_env(hooks.state.settings))
    assert out.exit_code == 0, out.output
    assert "unknown_labels" in out.output and "Tendon" in out.output and "webhook events failed: 1" in out.output


def _env(settings: Settings) -> dict[str, str]:
    return {"SONOSEG_DATA_DIR": str(settings.data_dir), "SONOSEG_DATABASE_URL": settings.database_url}


def test_an_annotation_with_zero_regions_is_a_valid_empty_label(hooks: Hooks) -> None:  # noqa: F811
    event = annotation_event("ANNOTATION_CREATED", 6, 10, hooks.urls[0], None)
    hooks.post(event)
    assert hooks.process().processed == 1
    (mv,) = hooks.versions()
    assert mv.is_current and mv.foreground_pixels == 0


def test_known_and_unknown_labels_together_keep_the_known_regions(hooks: Hooks) -> None:  # noqa: F811
    event = annotation_event("ANNOTATION_CREATED", 7, 10, hooks.urls[0], hooks.masks[0])
    extra = dict(event["annotation"]["result"][0])
    extra["value"] = dict(extra["value"], brushlabels=["Tendon"])
    event["annotation"]["result"].append(extra)
    hooks.post(event)
    assert hooks.process().processed == 1
    (mv,) = hooks.versions()
    np.testing.assert_array_equal(read_mask(hooks.state.store, mv), hooks.masks[0])


# -- item 14: one reading of a task, whatever path it arrives by -----------------------------------------------
@pytest.mark.parametrize("subject", ["17", 17])
def test_subject_is_read_the_same_as_string_or_integer(subject: object) -> None:
    assert LsTask.parse({"id": 1, "data": {"image": "/x.png", "subject": subject}}).subject == "17"


def test_webhook_and_predict_give_a_task_the_same_subject(hooks: Hooks) -> None:  # noqa: F811
    """Frames of one patient, one arriving by /predict with an integer subject, one by webhook with
    the same subject as a string, land in the same subject (and so the same split)."""
    body = {
        "project": "3.1",
        "label_config": DEFAULT_LABEL_CONFIG,
        "tasks": [{"id": 21, "data": {"image": hooks.urls[0], "subject": 4711}}],
    }
    assert hooks.client.post("/predict", json=body).status_code == 200
    event = annotation_event("ANNOTATION_CREATED", 8, 22, hooks.urls[1], hooks.masks[1])
    event["task"]["data"]["subject"] = "4711"
    hooks.post(event)
    hooks.process()
    with unit_of_work(hooks.state.factory) as session:
        subjects = {img.subject for img in session.scalars(select(Image))}
    assert len(subjects) == 1


def test_annotation_parse_keeps_label_studios_clock_and_user_id_only() -> None:
    ann = LsAnnotation.parse(
        {
            "id": 3,
            "task": {"id": 9},
            "result": [],
            "updated_at": "2026-11-25T10:00:00.5Z",
            "completed_by": {"id": 4, "email": "doe@hospital.example"},
            "lead_time": 3.5,
        }
    )
    assert (ann.task_id, ann.completed_by, ann.lead_time) == (9, 4, 3.5)
    assert ann.updated_at is not None and ann.updated_at.isoformat() == "2026-11-25T10:00:00.500000+00:00"


# -- items 12 and 13: duplicates with conflicting masks; re-imports ---------------------------------------------
@pytest.fixture
def importer(factory: SessionFactory, store: LocalBlobStore, settings: Settings) -> Importer:
    """``import_files`` into this test's database and store (project ``p``, Nerve and Vessel)."""
    return Importer(factory, store, settings)


def _dataset(tmp: Path, n: int = 4) -> tuple[Path, Path]:
    images, masks = tmp / "images", tmp / "masks"
    for i in range(n):
        img, mask = synthetic_frame(i)
        write_png(images / f"{i:04d}.png", img)
        write_png(masks / f"{i:04d}.png", mask)
    return images, masks


def _versions(factory: SessionFactory) -> list[tuple[int, int, bool, str]]:
    with factory() as s:
        return [
            (mv.image_id, mv.version, mv.is_current, mv.sha256)
            for mv in s.scalars(select(MaskVersion).order_by(MaskVersion.id))
        ]


def test_reimporting_identical_masks_creates_no_versions_and_no_retrain_count(
    tmp_path: Path, factory: SessionFactory, importer: Importer
) -> None:
    images, masks = _dataset(tmp_path)
    first = importer([images], mask_dir=masks)
    assert (first.masks_added, first.masks_unchanged) == (4, 0)
    before = _versions(factory)
    with factory() as s:
        snapshot = {mv.id for mv in s.scalars(select(MaskVersion).where(MaskVersion.is_current))}
    again = importer([images], mask_dir=masks)
    assert (again.masks_added, again.masks_unchanged, again.conflicts) == (0, 4, [])
    assert _versions(factory) == before
    with factory() as s:  # what the retrain trigger counts: current labels outside the last snapshot
        assert {mv.id for mv in s.scalars(select(MaskVersion).where(MaskVersion.is_current))} == snapshot
    # a real change of one mask is one new version, and it is current
    _img, mask = synthetic_frame(0)
    mask[:20, :20] = 2
    write_png(masks / "0000.png", mask)
    third = importer([images], mask_dir=masks)
    assert (third.masks_added, third.masks_unchanged) == (1, 3)


def test_conflicting_duplicates_keep_both_masks_and_wait_for_the_curator(
    tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, settings: Settings, importer: Importer
) -> None:
    img, mask = synthetic_frame(1)
    other = mask.copy()
    other[other == 1] = 0
    write_png(tmp_path / "images" / "0043.png", img)
    write_png(tmp_path / "images" / "0077.png", img)  # identical pixels
    write_png(tmp_path / "masks" / "0043.png", mask)
    write_png(tmp_path / "masks" / "0077.png", other)  # a different mask
    report = importer([tmp_path / "images"], mask_dir=tmp_path / "masks")
    assert report.images_added == 1 and len(report.conflicts) == 1
    assert "0077.png" in report.conflicts[0][0] and "sonoseg masks choose" in report.conflicts[0][1]
    with factory() as s:
        image = s.scalars(select(Image)).one()
        versions = s.scalars(select(MaskVersion).where(MaskVersion.image_id == image.id)).all()
        assert len(versions) == 2 and not any(v.is_current for v in versions)  # out of training
        issue = s.scalars(select(LabelIssue)).one()
        assert (issue.kind, issue.status, sorted(issue.mask_version_ids)) == (
            "conflicting_duplicate",
            "open",
            sorted(v.id for v in versions),
        )
        image_id = image.id
    # re-importing changes nothing: no new version, no second issue
    again = importer([tmp_path / "images"], mask_dir=tmp_path / "masks")
    assert again.masks_added == 0
    with factory() as s:
        assert len(s.scalars(select(MaskVersion)).all()) == 2
        assert len(s.scalars(select(LabelIssue)).all()) == 1
    # the curator chooses, on the command line
    from cli.main import cli

    env = _env(settings)
    out = CliRunner().invoke(cli, ["masks", "issues"], env=env)
    assert out.exit_code == 0 and "conflicting_duplicate" in out.output, out.output
    out = CliRunner().invoke(cli, ["masks", "choose", "--image", str(image_id), "--version", "2"], env=env)
    assert out.exit_code == 0, out.output
    with factory() as s:
        current = current_mask_version(s, s.get_one(Image, image_id))
        assert current is not None and current.version == 2
        np.testing.assert_array_equal(read_mask(store, current), other)
        assert s.scalars(select(LabelIssue)).one().status == "resolved"
    out = CliRunner().invoke(cli, ["masks", "choose", "--image", str(image_id), "--version", "9"], env=env)
    assert out.exit_code != 0 and "no mask version 9" in out.output


def test_usgra_seg_duplicate_pair_is_reported(shared_data: Path | None, tmp_path: Path, importer: Importer) -> None:
    if shared_data is None:
        pytest.skip("usgra-seg is not present")
    names = ("0043.png", "0077.png")
    images = [shared_data / "images" / n for n in names]
    if not all(p.exists() for p in images):
        pytest.skip("usgra-seg's duplicate pair is not where its README says")
    for p in images:
        (tmp_path / "i").mkdir(exist_ok=True)
        (tmp_path / "i" / p.name).write_bytes(p.read_bytes())
    report = importer([tmp_path / "i"], project="u", mask_dir=shared_data / "masks")
    assert report.images_added == 1 and len(report.conflicts) == 1


def test_choose_refuses_a_prediction_version(
    factory: SessionFactory, store: LocalBlobStore, importer: Importer, tmp_path: Path
) -> None:
    from backend.services.masks import add_mask_version

    images, _masks = _dataset(tmp_path, 1)
    importer([images])
    with unit_of_work(factory) as s:
        image = s.scalars(select(Image)).one()
        add_mask_version(
            s,
            store,
            s.scalars(select(Project)).one(),
            image,
            np.zeros((image.height, image.width), np.uint8),
            source="prediction",
        )
    from backend.errors import InvalidInput

    with pytest.raises(InvalidInput, match="prediction"):
        with unit_of_work(factory) as s:
            choose_version(s, s.scalars(select(Image)).one().id, 1)

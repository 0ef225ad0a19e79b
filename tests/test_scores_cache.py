"""Active-learning scores are cached per model version; the pool is the unlabelled training images; the
re-prediction after a promotion scores the pool with the new version. Real databases: SQLite, and
PostgreSQL when configured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete, func, select

from backend.db.models import Image, ImageScore, ImageSource, LabelIssue, MaskVersion, ModelVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidInput
from backend.model.scores import ImageScores
from backend.runtime import Runtime
from backend.services.images import SourceInfo, add_image
from backend.services.masks import add_mask_version
from backend.services.repredict import repredict_unlabelled
from backend.services.scores import (
    candidates_for,
    decode_embedding,
    encode_embedding,
    pool_image_ids,
    store_scores,
    unscored_images,
)
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.models import WORKER_TINY, record_version, register_model, save_tiny_checkpoint, tiny_spec


def unit(dim: int, hot: int) -> np.ndarray:
    v = np.full(dim, 0.01, np.float32)
    v[hot] = 1.0
    return v / np.linalg.norm(v)


def scores(entropy: float, hot: int = 0, dim: int = 16) -> ImageScores:
    return ImageScores(entropy, entropy / 2, entropy / 3, 0.25, unit(dim, hot))


def _image(s: object, project: Project, i: int, split: str = "train") -> Image:
    image = Image(
        project_id=project.id,
        sha256=f"{i:064x}",
        blob_key=f"images/{i}.png",
        width=4,
        height=3,
        subject=f"subj-{i % 3}",
        split=split,
        source_format="png",
    )
    s.add(image)  # type: ignore[attr-defined]
    return image


def test_scores_are_cached_per_model_version(factory: SessionFactory) -> None:
    with unit_of_work(factory) as s:
        project = Project(name="p", class_names=["Nerve", "Vessel"])
        s.add(project)
        s.flush()
        images = [_image(s, project, i) for i in range(3)]
        s.flush()
        ids = [img.id for img in images]
        v1 = record_version(s, project)
        v2 = record_version(s, project)  # promoted: v1 retired, its scores kept
        assert store_scores(s, v1.id, {i: scores(0.1, hot=1) for i in ids}) == 3
        assert store_scores(s, v2.id, {i: scores(0.7, hot=2) for i in ids[:2]}) == 2
        pid, v1_id, v2_id = project.id, v1.id, v2.id
    with unit_of_work(factory) as s:
        project = s.get_one(Project, pid)
        assert s.scalar(select(func.count()).select_from(ImageScore)) == 5  # two versions: two rows per image
        old = candidates_for(s, project, v1_id)
        new = candidates_for(s, project, v2_id)
        assert [c.image_id for c in old] == ids and {c.entropy for c in old} == {0.1}
        assert [c.image_id for c in new] == ids[:2] and {c.entropy for c in new} == {0.7}
        assert {c.subject for c in old} == {"subj-0", "subj-1", "subj-2"}
        np.testing.assert_allclose(new[0].embedding, unit(16, 2), atol=2e-3)
        assert new[0].embedding.dtype == np.float32 and abs(float(np.linalg.norm(new[0].embedding)) - 1) < 1e-6
        assert [p.image_id for p in unscored_images(s, project, v2_id)] == ids[2:]
        # idempotent: storing again replaces the row, never a second one
        assert store_scores(s, v2_id, {ids[0]: scores(0.9, hot=3)}) == 1
    with unit_of_work(factory) as s:
        rows = s.scalars(select(ImageScore).where(ImageScore.model_version_id == v2_id).order_by(ImageScore.image_id))
        assert [(r.image_id, r.entropy, r.embedding_dim, len(r.embedding)) for r in rows] == [
            (ids[0], 0.9, 16, 32),
            (ids[1], 0.7, 16, 32),
        ]
        s.execute(delete(ModelVersion).where(ModelVersion.id == v1_id))  # a version's scores go with it
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(ImageScore)) == 2


def test_the_pool_is_unlabelled_training_images_with_a_live_source(
    factory: SessionFactory, store: LocalBlobStore
) -> None:
    with unit_of_work(factory) as s:
        project = Project(name="p", class_names=["Nerve", "Vessel"])
        other = Project(name="q", class_names=["Nerve", "Vessel"])
        s.add_all([project, other])
        s.flush()
        free, val, test, labelled, issue, retired, still_shown = (
            _image(s, project, 0),
            _image(s, project, 1, "val"),
            _image(s, project, 2, "test"),
            _image(s, project, 3),
            _image(s, project, 4),
            _image(s, project, 5),
            _image(s, project, 6),
        )
        foreign = _image(s, other, 7)
        s.flush()
        add_mask_version(s, store, project, labelled, np.zeros((3, 4), np.uint8), source="import")
        s.add(
            LabelIssue(
                project_id=project.id, image_id=issue.id, kind="conflicting_duplicate", dedupe_key="k", detail="d"
            )
        )
        s.add(ImageSource(project_id=project.id, image_id=retired.id, kind="labelstudio", ls_task_id=1, active=False))
        s.add(
            ImageSource(project_id=project.id, image_id=still_shown.id, kind="labelstudio", ls_task_id=2, active=False)
        )
        s.add(ImageSource(project_id=project.id, image_id=still_shown.id, kind="labelstudio", ls_task_id=3))
        # a prediction mask is not a label
        add_mask_version(s, store, project, free, np.ones((3, 4), np.uint8), source="prediction")
        s.flush()
        assert pool_image_ids(s, project) == [free.id, still_shown.id]
        assert pool_image_ids(s, other) == [foreign.id]
        version = record_version(s, project)
        everything = [free, val, test, labelled, issue, retired, still_shown]
        store_scores(s, version.id, {img.id: scores(0.5) for img in everything})
        assert [c.image_id for c in candidates_for(s, project, version.id)] == [free.id, still_shown.id]
        with pytest.raises(InvalidInput, match="not images of project"):
            store_scores(s, version.id, {foreign.id: scores(0.5)})
        assert s.scalar(select(MaskVersion.id).where(MaskVersion.image_id == labelled.id, MaskVersion.is_current))


def test_bad_scores_are_refused(factory: SessionFactory) -> None:
    with unit_of_work(factory) as s:
        project = Project(name="p", class_names=["Nerve"])
        s.add(project)
        s.flush()
        image = _image(s, project, 0)
        s.flush()
        version = record_version(s, project)
        with pytest.raises(InvalidInput, match="not finite"):
            store_scores(s, version.id, {image.id: ImageScores(float("nan"), 0, 0, 0, unit(4, 0))})
        with pytest.raises(InvalidInput, match="1-D"):
            store_scores(s, version.id, {image.id: ImageScores(0, 0, 0, 0, np.ones((2, 2), np.float32))})
        with pytest.raises(InvalidInput, match="float16"):
            store_scores(s, version.id, {image.id: ImageScores(0, 0, 0, 0, np.array([1e6], np.float32))})


def test_embedding_round_trip() -> None:
    vector = unit(64, 5)
    blob, dim = encode_embedding(vector)
    assert dim == 64 and len(blob) == 128
    back = decode_embedding(blob, dim)
    assert back.dtype == np.float32 and float(back @ vector) > 0.9999
    assert not decode_embedding(*encode_embedding(np.zeros(3, np.float32))).any()
    with pytest.raises(InvalidInput):
        decode_embedding(blob[:-1], dim)


# -- recomputed after a promotion ----------------------------------------------------------------------------
def test_repredict_after_a_promotion_scores_the_pool_with_the_new_version(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings, tmp_path: Path
) -> None:
    """Not a Label Studio project: the Label Studio part is skipped, the pool is still scored."""
    rng = np.random.default_rng(0)
    with unit_of_work(factory) as s:
        project = Project(name="p", class_names=["Nerve", "Vessel"])
        s.add(project)
        s.flush()
        pid = project.id
        image_ids = []
        for i in range(10):  # more than one batch of 8
            added = add_image(
                s,
                store,
                project,
                rng.integers(0, 255, (48, 64), dtype=np.uint8),
                subject=f"subj-{i}",
                source=SourceInfo("import", ref=f"src-{i}"),
                split="val" if i == 9 else "train",
            )
            s.flush()
            image_ids.append(added.image.id)
    pool = image_ids[:9]
    runtime = Runtime.from_settings(settings.replace(device="cpu"))
    try:
        checkpoints = []
        for seed in (1, 2):
            path = tmp_path / f"v{seed}.safetensors"
            save_tiny_checkpoint(path, seed=seed, spec=tiny_spec(**WORKER_TINY))
            checkpoints.append(path)
        first = register_model(factory, store, pid, checkpoints[0])
        report = repredict_unlabelled(runtime.mirror, runtime.settings, pid, first.uid)
        assert report.skipped_reason == "not a Label Studio project"
        assert (report.scored, report.score_failed) == (9, 0)
        assert repredict_unlabelled(runtime.mirror, runtime.settings, pid, first.uid).scored == 0  # cached
        second = register_model(factory, store, pid, checkpoints[1])  # promoted: the pool is scored again
        assert repredict_unlabelled(runtime.mirror, runtime.settings, pid, second.uid).scored == 9
        with unit_of_work(factory) as s:
            project = s.get_one(Project, pid)
            rows = s.execute(select(ImageScore.image_id, ImageScore.model_version_id)).all()
            assert sorted(rows) == sorted((i, v) for i in pool for v in (first.id, second.id))
            new = candidates_for(s, project, second.id)
            assert [c.image_id for c in new] == pool
            for c in new:
                assert all(0.0 <= x <= 1.0 for x in (c.entropy, c.tta_disagreement, c.boundary_uncertainty))
                assert 0.0 <= c.foreground_fraction <= 1.0
                assert c.embedding.ndim == 1 and abs(float(np.linalg.norm(c.embedding)) - 1.0) < 1e-5
        stale = repredict_unlabelled(runtime.mirror, runtime.settings, pid, first.uid)  # a job for a retired version
        assert stale.skipped_reason is not None and stale.scored == 0
    finally:
        runtime.close()


# -- and when images arrive ------------------------------------------------------------------------------
def test_frames_that_arrive_after_the_promotion_are_scored_by_the_periodic_tick(
    factory: SessionFactory, store: LocalBlobStore, settings: Settings, tmp_path: Path
) -> None:
    """``projects_awaiting_scores`` finds the project again once a frame arrives; ``score_new_images``
    scores just that frame, and nothing once every pool image is scored."""
    from backend.services.repredict import score_new_images
    from backend.services.scores import projects_awaiting_scores

    rng = np.random.default_rng(1)

    def arrive(pid: int, i: int) -> int:
        with unit_of_work(factory) as s:
            project = s.get_one(Project, pid)
            frame = rng.integers(0, 255, (40, 56), dtype=np.uint8)
            added = add_image(s, store, project, frame, subject=f"a{i}", source=SourceInfo("import", ref=f"a{i}"))
            added.image.split = "train"
            return added.image.id

    with unit_of_work(factory) as s:
        project = Project(name="p", class_names=["Nerve", "Vessel"])
        unserved = Project(name="q", class_names=["Nerve", "Vessel"])
        s.add_all([project, unserved])
        s.flush()
        pid, qid = project.id, unserved.id
    first = [arrive(pid, i) for i in range(3)]
    arrive(qid, 99)  # no model serves q: nothing to score it with
    with factory() as s:
        assert projects_awaiting_scores(s) == []
    path = tmp_path / "v.safetensors"
    save_tiny_checkpoint(path, seed=3, spec=tiny_spec(**WORKER_TINY))
    version = register_model(factory, store, pid, path)
    with factory() as s:
        assert projects_awaiting_scores(s) == [pid]
    cpu = settings.replace(device="cpu")
    assert score_new_images(factory, store, cpu, pid).scored == 3
    with factory() as s:
        assert projects_awaiting_scores(s) == []
    assert score_new_images(factory, store, cpu, pid).skipped_reason == "every pool image is scored"
    late = arrive(pid, 7)
    with factory() as s:
        assert projects_awaiting_scores(s) == [pid]
    assert score_new_images(factory, store, cpu, pid).scored == 1
    with factory() as s:
        rows = s.scalars(select(ImageScore.image_id).where(ImageScore.model_version_id == version.id))
        assert sorted(rows) == sorted([*first, late])
    assert score_new_images(factory, store, cpu, qid).skipped_reason == "no serving model"

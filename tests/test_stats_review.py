"""Curators' `sonoseg stats` and `sonoseg review` on hand-made projects whose numbers are known exactly.

Frames are 64 x 64 with square structures: a bright (200) nerve, a dark (5) vessel on a grey (100)
background, so that the stand-in ThresholdModel (> 170 Nerve, < 15 Vessel) predicts exactly what is
drawn, and a label differs from the "model" only where a test makes it wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from backend.db.models import Image, Prediction, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidInput
from backend.imaging.io import decode_png_bytes, encode_png
from backend.model.overlay import labelled_overlay, panel_size, review_panel
from backend.services.dataset import import_files
from backend.services.images import SourceInfo, add_image
from backend.services.label_issues import record_issue
from backend.services.masks import add_mask_version
from backend.services.projects import get_or_create_project
from backend.services.review import (
    KINDS,
    build_review,
    default_review_dir,
    plan_review,
    write_overlays,
)
from backend.services.splits import assign_split
from backend.services.stats import ClassAccumulator, count_dataset, dataset_stats, measure_labels
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from cli.main import cli
from tests.support.models import CLASSES, ThresholdModel, fake_loader, record_version

SIZE = 64


def _square(mask: np.ndarray, r: int, c: int, side: int, value: int) -> np.ndarray:
    mask[r : r + side, c : c + side] = value
    return mask


def _mask(*squares: tuple[int, int, int, int]) -> np.ndarray:
    """A mask of (row, col, side, class) squares."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for r, c, side, cls in squares:
        _square(mask, r, c, side, cls)
    return mask


def _frame(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """The frame that ThresholdModel segments as ``mask``; ``seed`` varies one background pixel
    (kept between the thresholds) so that frames with equal masks are distinct images."""
    frame = np.full((SIZE, SIZE), 100, np.uint8)
    frame[mask == 1] = 200
    frame[mask == 2] = 5
    frame[SIZE - 1, SIZE - 1 - seed % SIZE] = 101 + seed // SIZE
    return frame


def _add(session: Session, store: LocalBlobStore, project: Project, frame: np.ndarray, subject: str, ref: str) -> Image:
    return add_image(session, store, project, frame, subject=subject, source=SourceInfo("import", ref=ref)).image


# -- stats ------------------------------------------------------------------------------------------
@pytest.fixture
def stats_project(tmp_path: Path, factory: SessionFactory, store: LocalBlobStore, settings: Settings) -> int:
    """Five images, four subjects: three labelled (an import, an annotation, a relabelled image),
    one unlabelled, one conflicting duplicate (two imported files, same pixels, different masks)."""
    with unit_of_work(factory) as session:
        project = get_or_create_project(session, "stats", class_names=CLASSES)
        img1 = _add(session, store, project, _frame(_mask()), "subj-s1", "src-1")
        add_mask_version(session, store, project, img1, _mask((5, 5, 10, 1), (40, 40, 5, 2)), source="import")
        add_mask_version(session, store, project, img1, _mask((5, 5, 10, 1)), source="prediction")
        img2 = _add(session, store, project, _frame(_mask(), 1), "subj-s1", "src-2")
        # a 10 x 10 nerve and two 2 x 2 dabs touching at a corner: one 8-connected object of 8 px
        two = _mask((5, 5, 10, 1), (30, 30, 2, 1), (32, 32, 2, 1))
        add_mask_version(session, store, project, img2, two, source="annotation", author="alice", ls_annotation_id=1)
        img3 = _add(session, store, project, _frame(_mask(), 2), "subj-s2", "src-3")
        add_mask_version(session, store, project, img3, _mask((0, 0, 6, 1)), source="annotation", author="alice")
        relabel = _mask((0, 0, 6, 1), (50, 50, 4, 2))
        add_mask_version(session, store, project, img3, relabel, source="annotation", author="bob", ls_annotation_id=3)
        _add(session, store, project, _frame(_mask(), 3), "subj-s3", "src-4")
        project_id = project.id
    frame = _frame(_mask(), 4)
    for name, mask in (("a", _mask((1, 1, 3, 1))), ("b", _mask((1, 1, 4, 1)))):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{name}.png").write_bytes(encode_png(frame))
        (tmp_path / "masks" / f"{name}.png").write_bytes(encode_png(mask))
    report = import_files(
        factory,
        store,
        settings,
        project_name="stats",
        class_names=CLASSES,
        paths=[tmp_path / "in" / "a.png", tmp_path / "in" / "b.png"],
        mask_dir=tmp_path / "masks",
    )
    assert len(report.conflicts) == 1
    return project_id


def test_stats_numbers_are_exact(stats_project: int, factory: SessionFactory, store: LocalBlobStore) -> None:
    seen: list[tuple[int, int]] = []
    with unit_of_work(factory) as session:
        project = session.get_one(Project, stats_project)
        stats = dataset_stats(session, store, project, on_item=lambda done, total: seen.append((done, total)))
        subjects = {image.subject for image in session.query(Image).filter(Image.project_id == stats_project)}
    assert seen == [(1, 3), (2, 3), (3, 3)]  # each current label read once
    assert (stats.images, stats.labelled, stats.labelled_pixels) == (5, 3, 3 * SIZE * SIZE)

    def split(subject: str) -> str:
        return assign_split(subject, salt=str(stats_project))

    conflict_subject = next(s for s in subjects if s not in {"subj-s1", "subj-s2", "subj-s3"})
    expected = {s: [0, 0] for s in ("train", "val", "test")}
    for subject, labelled in (("subj-s1", 1), ("subj-s1", 1), ("subj-s2", 1), ("subj-s3", 0), (conflict_subject, 0)):
        expected[split(subject)][0] += 1
        expected[split(subject)][1] += labelled
    assert {s.split: [s.images, s.labelled] for s in stats.splits} == expected
    assert [s.split for s in stats.splits] == ["train", "val", "test"]
    assert {(s.subject, s.images, s.labelled) for s in stats.subjects} == {
        ("subj-s1", 2, 2),
        ("subj-s2", 1, 1),
        ("subj-s3", 1, 0),
        (conflict_subject, 1, 0),
    }

    nerve, vessel = stats.classes
    assert (nerve.name, nerve.images, nerve.pixels, nerve.objects) == ("Nerve", 3, 100 + 108 + 36, 4)
    assert nerve.prevalence == pytest.approx(244 / (3 * SIZE * SIZE))
    assert nerve.sizes is not None and (nerve.sizes.min, nerve.sizes.median, nerve.sizes.max) == (8, 68.0, 100)
    assert nerve.sizes.p95 == pytest.approx(float(np.percentile([8, 36, 100, 100], 95)))
    assert (vessel.name, vessel.images, vessel.pixels, vessel.objects) == ("Vessel", 2, 41, 2)
    assert vessel.sizes is not None and (vessel.sizes.min, vessel.sizes.median, vessel.sizes.max) == (16, 20.5, 25)
    assert stats.connectivity == 8

    assert [(a.name, a.count) for a in stats.annotators] == [("alice", 1), ("bob", 1)]
    assert {v.name: v.count for v in stats.versions_by_source} == {"annotation": 3, "import": 3, "prediction": 1}
    assert stats.images_with_several_label_versions == 2  # the relabelled image and the conflict
    assert {v.name: v.count for v in stats.current_by_source} == {"annotation": 2, "import": 1, "prediction": 0}
    assert stats.conflicting_duplicates == 1

    payload = json.loads(json.dumps(stats.to_json()))
    assert payload["subjects_count"] == 4 and payload["classes"][0]["objects"] == 4


def test_stats_in_two_phases_equal_one(stats_project: int, factory: SessionFactory, store: LocalBlobStore) -> None:
    with unit_of_work(factory) as session:
        project = session.get_one(Project, stats_project)
        counts = count_dataset(session, project)
        whole = dataset_stats(session, store, project)
    assert measure_labels(store, counts) == whole  # the masks read outside any transaction


@hsettings(max_examples=60, deadline=None)
@given(
    st.lists(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 2)), max_size=6)
)
def test_class_statistics_invariants(masks: list[np.ndarray]) -> None:
    acc = ClassAccumulator(2)
    for mask in masks:
        acc.add(mask)
    pixels = sum(m.size for m in masks)
    classes = acc.classes(CLASSES, pixels)
    assert sum(c.prevalence for c in classes) <= 1.0 + 1e-9
    for c in classes:
        assert c.images <= len(masks) and c.objects >= c.images
        assert c.pixels == sum(int((m == c.index).sum()) for m in masks)
        if c.sizes is None:
            assert c.objects == 0 and c.pixels == 0
        else:
            assert 1 <= c.sizes.min <= c.sizes.median <= c.sizes.p95 <= c.sizes.max <= c.pixels


# -- review -----------------------------------------------------------------------------------------
NERVE = (10, 10, 12, 1)  # 144 px
VESSEL = (40, 44, 6, 2)  # 36 px


def _shifted(dr: int) -> tuple[int, int, int, int]:
    return (NERVE[0] + dr, *NERVE[1:])


@pytest.fixture
def review_project(factory: SessionFactory, store: LocalBlobStore) -> dict[str, int]:
    """Image ids by role. A serving model version (its checkpoint absent: a stand-in serves it)."""
    ids: dict[str, int] = {}
    with unit_of_work(factory) as session:
        project = get_or_create_project(session, "review", class_names=CLASSES)
        truth = _mask(NERVE, VESSEL)

        def image(role: str, drawn: np.ndarray, seed: int) -> Image:
            img = _add(session, store, project, _frame(drawn, seed), "subj-r", f"src-{role}")
            ids[role] = img.id
            return img

        for i in range(6):  # agreeing labels: not queued for disagreement
            add_mask_version(session, store, project, image(f"ok{i}", truth, i), truth, source="import")
        wrong = image("wrong", truth, 10)  # the label misses the nerve and the vessel entirely
        add_mask_version(session, store, project, wrong, _mask((45, 5, 12, 1), (2, 40, 6, 2)), source="import")
        moderate = image("moderate", truth, 11)  # nerve 3 px off: Dice (0.75 + 1) / 2
        add_mask_version(session, store, project, moderate, _mask(_shifted(3), VESSEL), source="import")
        rater = image("rater_far", truth, 12)  # alice right, bob 6 px off (current)
        add_mask_version(session, store, project, rater, truth, source="annotation", author="alice", ls_annotation_id=1)
        far = _mask(_shifted(6), VESSEL)
        add_mask_version(session, store, project, rater, far, source="annotation", author="bob", ls_annotation_id=2)
        near = image("rater_near", truth, 13)  # carol right, dave 1 px off
        add_mask_version(session, store, project, near, truth, source="annotation", author="carol", ls_annotation_id=3)
        one = _mask(_shifted(1), VESSEL)
        add_mask_version(session, store, project, near, one, source="annotation", author="dave", ls_annotation_id=4)
        same = image("rater_same", truth, 14)  # erin and frank agree: no inter-rater item
        add_mask_version(session, store, project, same, truth, source="annotation", author="erin", ls_annotation_id=5)
        add_mask_version(session, store, project, same, truth, source="annotation", author="frank", ls_annotation_id=6)
        big = _mask((5, 5, 30, 1), VESSEL)  # a 900 px nerve among 144 px ones
        add_mask_version(session, store, project, image("big", big, 15), big, source="import")
        speck = _mask(NERVE, VESSEL, (60, 2, 2, 1))  # and a 4 px dab
        add_mask_version(session, store, project, image("speck", speck, 16), speck, source="import")
        conflict = image("conflict", truth, 17)
        a = add_mask_version(session, store, project, conflict, truth, source="import", may_become_current=False)
        b = add_mask_version(session, store, project, conflict, _mask(NERVE), source="import", may_become_current=False)
        record_issue(
            session,
            project_id=project.id,
            kind="conflicting_duplicate",
            detail="identical pixels, different masks",
            dedupe=(conflict.id, "a", "b"),
            image_id=conflict.id,
            mask_version_ids=[a.mask_version.id, b.mask_version.id],
        )
        version = record_version(session, project)
        # stored predictions of the serving model: an older perfect one and the latest (the frame's truth)
        # for `moderate`; every other image is predicted by the stand-in model when the review runs
        for mask in (_mask(_shifted(3), VESSEL), truth):
            mv = add_mask_version(session, store, project, moderate, mask, source="prediction").mask_version
            session.add(
                Prediction(
                    image_id=moderate.id,
                    model_version_id=version.id,
                    model_version_uid=version.uid,
                    mask_version_id=mv.id,
                )
            )
            session.flush()
        ids["project"] = project.id
    return ids


def _review(factory: SessionFactory, store: LocalBlobStore, project_id: int, model: ThresholdModel, **kw):  # type: ignore[no-untyped-def]
    with unit_of_work(factory) as session:
        plan = plan_review(session, session.get_one(Project, project_id))
    return build_review(plan, store, fake_loader(model, [], set()), **kw)


def test_review_ranks_each_kind(review_project: dict[str, int], factory: SessionFactory, store: LocalBlobStore) -> None:
    ids = review_project
    model = ThresholdModel()
    report = _review(factory, store, ids["project"], model)
    by_kind = {kind: [i for i in report.items if i.kind == kind] for kind in KINDS}
    assert [i.rank for i in report.items] == list(range(1, len(report.items) + 1))
    assert [i.kind for i in report.items] == sorted((i.kind for i in report.items), key=KINDS.index)

    disagree = by_kind["model_disagreement"]
    assert [i.image_id for i in disagree] == [ids["wrong"], ids["rater_far"], ids["moderate"], ids["rater_near"]]
    assert disagree[0].score == 0.0 and disagree[0].other_mask is not None  # predicted now
    moderate = disagree[2]
    assert moderate.score == pytest.approx((0.75 + 1) / 2) and moderate.other is not None  # the latest stored one
    assert moderate.other_mask is None
    assert sum(model.calls) == 12  # every labelled image but the one with a stored prediction, once

    raters = by_kind["inter_rater"]
    assert [i.image_id for i in raters] == [ids["rater_far"], ids["rater_near"]]
    assert raters[0].score == pytest.approx((0.5 + 1) / 2) and "alice" in raters[0].reason and "bob" in raters[0].reason
    assert raters[1].score == pytest.approx((2 * 132 / 288 + 1) / 2)

    (conflict,) = by_kind["conflicting_duplicate"]
    assert conflict.image_id == ids["conflict"] and conflict.score == pytest.approx(0.5)  # vessel only in one

    sizes = by_kind["size_outlier"]
    assert [i.image_id for i in sizes] == [ids["big"], ids["speck"]]
    assert "900 px" in sizes[0].reason and "4 px" in sizes[1].reason
    assert sizes[0].score > sizes[1].score > 3.5

    counts = {c.kind: (c.candidates, c.listed) for c in report.counts}
    assert counts == {
        "model_disagreement": (4, 4),
        "inter_rater": (2, 2),
        "conflicting_duplicate": (1, 1),
        "size_outlier": (2, 2),
    }
    assert report.model_uid is not None and any("1 image(s) compared with stored" in n for n in report.notes)

    limited = _review(factory, store, ids["project"], ThresholdModel(), limit=1)
    assert [(i.kind, i.image_id) for i in limited.items] == [
        ("model_disagreement", ids["wrong"]),
        ("inter_rater", ids["rater_far"]),
        ("conflicting_duplicate", ids["conflict"]),
        ("size_outlier", ids["big"]),
    ]
    with pytest.raises(InvalidInput, match="limit"):
        _review(factory, store, ids["project"], ThresholdModel(), limit=0)


def test_review_overlays(
    review_project: dict[str, int], factory: SessionFactory, store: LocalBlobStore, tmp_path: Path
) -> None:
    report = _review(factory, store, review_project["project"], ThresholdModel(), limit=2)
    out = tmp_path / "review"
    (out).mkdir()
    (out / "999_size_outlier_image1.png").write_bytes(b"stale")  # an earlier run's overlay: replaced
    (out / "notes.txt").write_text("kept")
    done = write_overlays(store, report, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i.rank:03d}_{i.kind}_image{i.image_id}.png" for i in done.items] + ["notes.txt"])
    _, panel_width = panel_size(SIZE, SIZE)
    for item in done.items:
        assert item.overlay is not None
        rgb = decode_png_bytes(Path(item.overlay).read_bytes())
        assert rgb.ndim == 3 and rgb.shape[1] == 3 * panel_width and rgb.shape[0] > panel_width
    assert default_review_dir(Path("/d"), "my project/x") == Path("/d/review/my_project_x")


def test_review_without_a_model(stats_project: int, factory: SessionFactory, store: LocalBlobStore) -> None:
    with unit_of_work(factory) as session:
        plan = plan_review(session, session.get_one(Project, stats_project))
    report = build_review(plan, store, fake_loader(ThresholdModel(), [], set()))
    assert not [i for i in report.items if i.kind == "model_disagreement"]
    assert any("no model serves" in n for n in report.notes)
    assert [i.kind for i in report.items if i.kind == "inter_rater"] == ["inter_rater"]  # alice vs bob
    assert [i.kind for i in report.items if i.kind == "conflicting_duplicate"] == ["conflicting_duplicate"]
    # too few objects for a spread: only the minimum size rule applies (the 8 px dab)
    assert [i.score for i in report.items if i.kind == "size_outlier"] == [0.0]


# -- overlays ---------------------------------------------------------------------------------------
def test_overlay_shapes_and_colours() -> None:
    mask = _mask(NERVE, VESSEL)
    frame = _frame(mask)
    one = labelled_overlay(frame, mask, CLASSES, "score 0.9")
    assert one.shape == (SIZE, SIZE, 3) and one.dtype == np.uint8
    assert tuple(one[VESSEL[0] + 5, VESSEL[1] + 2]) == (220, 20, 60)  # the vessel's contour, bottom edge
    assert tuple(one[VESSEL[0] + 2, VESSEL[1] + 2]) != (220, 20, 60)  # inside: tinted only
    ph, pw = panel_size(SIZE, SIZE)
    three = review_panel(frame, mask, None, CLASSES, "title\nreason")
    assert three.shape[1] == 3 * pw and three.shape[0] > ph
    big = np.zeros((1300, 700), np.uint8)
    assert panel_size(1300, 700) == (434, 234)  # every third pixel
    assert review_panel(big, big, big, CLASSES, "t").shape[1] == 3 * 234
    with pytest.raises(ValueError, match="shape"):
        review_panel(frame, mask[:10], None, CLASSES, "t")


# -- the CLI ----------------------------------------------------------------------------------------
def test_cli_stats_and_review(stats_project: int, review_project: dict[str, int], settings: Settings) -> None:
    runner = CliRunner()
    env = settings.to_env()
    text = runner.invoke(cli, ["stats", "--project", "stats"], env=env)
    assert text.exit_code == 0, text.output
    assert "5 images, 3 labelled, 4 subjects" in text.stdout and "Nerve" in text.stdout
    assert "alice 1, bob 1" in text.stdout and "conflicting duplicates (open issues): 1" in text.stdout
    as_json = runner.invoke(cli, ["stats", "--project", "stats", "--json"], env=env)
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["labelled"] == 3

    missing = runner.invoke(cli, ["stats", "--project", "nope"], env=env)
    assert missing.exit_code == 1 and "no project 'nope'" in missing.output and "Traceback" not in missing.output

    # the stand-in model is not what the CLI loads: the version's checkpoint is absent, so only the
    # stored prediction is compared, and the report says why the others were not
    review = runner.invoke(cli, ["review", "--project", "review", "--json", "--limit", "3"], env=env)
    assert review.exit_code == 0, review.output
    payload = json.loads(review.stdout)
    assert any("could not be loaded" in n for n in payload["notes"])
    kinds = [i["kind"] for i in payload["items"]]
    assert kinds.count("model_disagreement") == 1 and "size_outlier" in kinds
    out = default_review_dir(settings.data_dir, "review")
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(i["overlay"]).name for i in payload["items"])

    plain = runner.invoke(cli, ["review", "--project", "stats", "--out", str(settings.data_dir / "r2")], env=env)
    assert plain.exit_code == 0, plain.output
    assert "model_disagreement skipped: no model serves" in plain.stdout and "inter_rater" in plain.stdout


def test_queries_do_not_grow_with_the_project(
    stats_project: int, engine: Engine, factory: SessionFactory, store: LocalBlobStore
) -> None:
    """No per-image queries: the same number of statements for 5 images as for 25."""
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    def run() -> int:
        statements.clear()
        with unit_of_work(factory) as session:
            project = session.get_one(Project, stats_project)
            count_dataset(session, project)
            plan_review(session, project)
        return len(statements)

    event.listen(engine, "before_cursor_execute", count)
    try:
        before = run()
        with unit_of_work(factory) as session:
            project = session.get_one(Project, stats_project)
            for i in range(20):
                image = _add(session, store, project, _frame(_mask(), 100 + i), f"subj-x{i}", f"src-x{i}")
                for author in ("carol", "dave"):
                    mask = _mask((i, i, 4 + (author == "dave"), 1))
                    add_mask_version(session, store, project, image, mask, source="annotation", author=author)
        assert run() == before
    finally:
        event.remove(engine, "before_cursor_execute", count)

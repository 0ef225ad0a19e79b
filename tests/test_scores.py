"""Acquisition scores and embeddings (backend.model.scores) on tiny untrained networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.errors import InvalidImage, InvalidInput
from backend.model.predict import PredictOptions, Predictor
from backend.model.scores import ImageScores, boundary_band, frame_scores, score_images, unit_vector
from tests.support.frames import synthetic_frame
from tests.support.models import save_tiny_checkpoint, tiny_spec

torch.set_num_threads(1)


def predictor(tmp_path: Path, options: PredictOptions | None = None, **spec_changes: object) -> Predictor:
    path = tmp_path / "tiny.safetensors"
    save_tiny_checkpoint(path, spec=tiny_spec(**spec_changes))
    return Predictor.from_file(path, device="cpu", options=options or PredictOptions(batch_size=3))


def check_ranges(s: ImageScores, dim: int) -> None:
    for value in (s.entropy, s.tta_disagreement, s.boundary_uncertainty, s.foreground_fraction):
        assert 0.0 <= value <= 1.0
    assert s.embedding.dtype == np.float32 and s.embedding.shape == (dim,)
    assert abs(float(np.linalg.norm(s.embedding)) - 1.0) < 1e-5


@pytest.mark.parametrize("arch", ["umamba_bot_2d", "resunet_2d"])
def test_scores_are_in_range_embeddings_unit_and_one_per_frame_in_order(tmp_path: Path, arch: str) -> None:
    p = predictor(tmp_path, arch=arch)
    frames = [synthetic_frame(i, size)[0] for i, size in enumerate([(40, 56), (32, 32), (40, 56), (21, 70), (40, 56)])]
    scores = score_images(p, frames)
    assert len(scores) == len(frames)
    for s in scores:
        check_ranges(s, p.spec.features[-1])
    # Batching frames of equal size together does not change a frame's scores.
    alone = score_images(p, [frames[2]])[0]
    assert alone.entropy == pytest.approx(scores[2].entropy, abs=1e-5)
    assert alone.boundary_uncertainty == pytest.approx(scores[2].boundary_uncertainty, abs=1e-5)
    np.testing.assert_allclose(alone.embedding, scores[2].embedding, atol=1e-5)
    assert score_images(p, []) == []


def test_same_frame_same_scores_and_near_duplicates_embed_alike(tmp_path: Path) -> None:
    p = predictor(tmp_path)
    frame = synthetic_frame(3, (48, 64))[0]
    noisy = np.clip(frame.astype(int) + np.random.default_rng(0).integers(-2, 3, frame.shape), 0, 255).astype(np.uint8)
    a, b, flipped, near = score_images(p, [frame, frame.copy(), np.ascontiguousarray(frame[:, ::-1]), noisy])
    # Two copies in one batch agree to float32 rounding: channels-last oneDNN kernels may split a
    # batch across threads so that the two positions sum in different orders. On a 2-core Xeon with
    # AMX (2026-12-03) the two positions' scores and embedding values differed by up to 3e-5 (1e-3
    # relative) after the whole network, far below what changes a ranking; a few ulp elsewhere.
    for name in ("entropy", "tta_disagreement", "boundary_uncertainty", "foreground_fraction"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-3), name
    np.testing.assert_allclose(a.embedding, b.embedding, atol=2e-4)
    assert float(a.embedding @ flipped.embedding) > 0.99
    assert float(a.embedding @ near.embedding) > 0.99
    # A mirrored frame's scores are its own mirror image's: the two passes swap roles.
    assert flipped.tta_disagreement == pytest.approx(a.tta_disagreement, abs=1e-4)
    assert flipped.entropy == pytest.approx(a.entropy, abs=1e-4)


def test_sliding_window_inference_is_scored_too(tmp_path: Path) -> None:
    p = predictor(tmp_path, PredictOptions(max_whole_pixels=16 * 16, batch_size=2))
    frames = [synthetic_frame(i, (40, 52))[0] for i in range(3)]
    for s in score_images(p, frames):
        check_ranges(s, p.spec.features[-1])


def test_invalid_frames_are_refused(tmp_path: Path) -> None:
    p = predictor(tmp_path)
    with pytest.raises(InvalidImage):
        score_images(p, [np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(InvalidImage):
        score_images(p, [np.zeros((8, 8), np.float32)])


def test_a_network_without_encoder_stages_has_no_embedding() -> None:
    from backend.model.scores import bottleneck_module

    with pytest.raises(InvalidInput):
        bottleneck_module(torch.nn.Conv2d(1, 2, 3))


def test_flip_disagreement_is_total_variation_over_the_candidate_region() -> None:
    p = np.zeros((3, 10, 10), np.float32)
    p[0] = 1.0
    p[:, 2:6, 2:6] = np.array([0.0, 1.0, 0.0])[:, None, None]
    same = frame_scores(p, p.copy(), np.ones(4))
    assert same.tta_disagreement == 0.0
    assert same.foreground_fraction == pytest.approx(16 / 100)
    assert same.entropy < 1e-6 and same.boundary_uncertainty < 1e-6  # confident everywhere
    q = p.copy()
    q[:, 2:6, 2:6] = np.array([0.0, 0.0, 1.0])[:, None, None]  # the mirror says Vessel, not Nerve
    assert frame_scores(p, q, np.ones(4)).tta_disagreement == pytest.approx(1.0)
    empty = np.zeros_like(p)
    empty[0] = 1.0
    s = frame_scores(empty, empty, np.zeros(4))
    assert (s.entropy, s.tta_disagreement, s.boundary_uncertainty, s.foreground_fraction) == (0.0, 0.0, 0.0, 0.0)
    uncertain = np.full_like(p, 1 / 3)
    assert frame_scores(uncertain, uncertain, np.ones(4)).entropy == pytest.approx(1.0)
    assert abs(float(np.linalg.norm(s.embedding)) - 1.0) < 1e-6  # a zero vector still gets a unit embedding


def test_boundary_band_rings_each_object_but_not_the_frame_edge() -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 1
    mask[0:4, 16:20] = 2  # touches the frame's edge
    band = boundary_band(mask, 3, 2)
    assert band[5, 5] and band[3, 8] and band[6, 8] and not band[10, 10] and not band[2, 8]
    assert not band[0, 19]  # the frame edge is not an outline
    assert band[0, 14] and band[2, 17]
    assert not boundary_band(np.zeros((5, 5), np.uint8), 3, 2).any()
    np.testing.assert_allclose(np.linalg.norm(unit_vector(np.array([3.0, 4.0]))), 1.0)

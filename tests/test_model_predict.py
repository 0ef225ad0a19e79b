"""Predictor: natural size, padding, resampling, batching, TTA, post-processing and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.errors import InvalidImage
from backend.model.checkpoint import Checkpoint
from backend.model.inference import crop_padding, pad_to_multiple
from backend.model.networks import build_model
from backend.model.predict import (
    PredictOptions,
    Predictor,
    frame_score,
    keep_largest_component,
    normalized_entropy,
)
from tests.support.models import tiny_spec

torch.set_num_threads(1)


def make_predictor(options: PredictOptions | None = None, **spec_changes: object) -> Predictor:
    spec = tiny_spec(**spec_changes)
    torch.manual_seed(0)
    return Predictor(Checkpoint(spec, build_model(spec).state_dict()), device="cpu", options=options)


def frames(*shapes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=s, dtype=np.uint8) for s in shapes]


def test_results_come_back_at_natural_size_in_order_with_valid_maps() -> None:
    predictor = make_predictor()
    images = frames((37, 45), (16, 16), (37, 45), (9, 70))
    results = predictor.predict(images)
    assert [r.mask.shape for r in results] == [im.shape for im in images]
    for image, r in zip(images, results, strict=True):
        assert r.probabilities.shape == (3, *image.shape) and r.probabilities.dtype == np.float32
        np.testing.assert_allclose(r.probabilities.sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(r.mask, r.probabilities.argmax(0))
        assert r.uncertainty_map.shape == image.shape
        assert r.uncertainty_map.min() >= 0.0 and r.uncertainty_map.max() <= 1.0
        assert 0.0 <= r.score <= 1.0 and 0.0 <= r.uncertainty <= 1.0
        assert r.class_names == ("background", "Nerve", "Vessel")
    # Batching equal sizes together must not change a frame's result: exactly (1e-5) in float32; in
    # bfloat16 (the default where the CPU has it) within bfloat16's resolution, since oneDNN's
    # channels-last kernels split a batch of 2 differently from a batch of 1 across threads.
    alone = predictor.predict([images[2]])[0]
    np.testing.assert_allclose(alone.probabilities, results[2].probabilities, atol=1e-2)
    exact = make_predictor(PredictOptions(mixed_precision=False))
    batched, single = exact.predict(images)[2], exact.predict([images[2]])[0]
    np.testing.assert_allclose(single.probabilities, batched.probabilities, atol=1e-5)


def test_padding_is_symmetric_and_cropped_back() -> None:
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    padded, pads = pad_to_multiple(x, 4)
    assert padded.shape[-2:] == (8, 8) and pads == (1, 2, 0, 1)
    torch.testing.assert_close(crop_padding(padded, pads), x)
    assert float(padded[..., 0, :].abs().sum()) == 0.0  # zero = the mean after z-scoring


def test_input_scale_resamples_there_and_back() -> None:
    predictor = make_predictor(input_scale=0.5)
    (r,) = predictor.predict(frames((50, 66)))
    assert r.mask.shape == (50, 66) and r.probabilities.shape == (3, 50, 66)


def test_flip_tta_is_left_right_equivariant() -> None:
    predictor = make_predictor(PredictOptions(tta_flip=True))
    (image,) = frames((16, 24))
    a = predictor.predict([image])[0].probabilities
    b = predictor.predict([np.ascontiguousarray(image[:, ::-1])])[0].probabilities
    np.testing.assert_allclose(a, b[..., ::-1], atol=1e-5)


def test_sliding_window_covers_large_frames_and_enc_channel_tokens() -> None:
    # Force sliding windows; an Enc net with channel tokens only accepts its 16x16 patch.
    predictor = make_predictor(PredictOptions(max_whole_pixels=1), arch="umamba_enc_2d", features=(4, 8, 16))
    assert any(k.endswith("mamba_layers.2.norm.weight") for k in predictor.model.state_dict())
    (r,) = predictor.predict(frames((30, 41)))
    assert r.mask.shape == (30, 41)
    np.testing.assert_allclose(r.probabilities.sum(0), 1.0, atol=1e-5)


def test_bad_frames_are_rejected() -> None:
    predictor = make_predictor()
    with pytest.raises(InvalidImage, match="image 1"):
        predictor.predict([frames((8, 8))[0], np.zeros((8, 8), np.float32)])
    with pytest.raises(InvalidImage):
        predictor.predict([np.zeros((8, 8, 3), np.uint8)])


def test_keep_largest_component_per_class() -> None:
    mask = np.zeros((6, 8), np.uint8)
    mask[0:2, 0:2] = 1  # 4 px
    mask[4:6, 4:8] = 1  # 8 px: kept
    mask[0, 6] = 2  # single vessel pixel: kept (only component)
    out = keep_largest_component(mask, 3)
    assert out[0:2, 0:2].sum() == 0 and (out[4:6, 4:8] == 1).all() and out[0, 6] == 2


def test_score_and_entropy_definitions() -> None:
    probs = np.zeros((3, 1, 2), np.float32)
    probs[:, 0, 0] = [0.2, 0.7, 0.1]  # predicted nerve, prob 0.7
    probs[:, 0, 1] = [0.9, 0.05, 0.05]  # background
    mask = probs.argmax(0)
    assert frame_score(probs, mask) == pytest.approx(0.7)
    assert frame_score(probs[:, :, 1:], mask[:, 1:]) == pytest.approx(0.9)  # empty: sure of background
    uniform = np.full((3, 1, 1), 1 / 3, np.float32)
    assert normalized_entropy(uniform)[0, 0] == pytest.approx(1.0, abs=1e-5)
    certain = np.array([1.0, 0.0, 0.0], np.float32).reshape(3, 1, 1)
    assert normalized_entropy(certain)[0, 0] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("arch", ["umamba_bot_2d", "resunet_2d"])
def test_channels_last_serving_matches_a_contiguous_float32_forward(arch: str) -> None:
    """The Predictor serves in channels-last on the CPU (faster convolutions); the probabilities
    must be those of the plain contiguous network, tiles and TTA included."""
    from backend.model.data import prepare_image
    from backend.model.inference import predict_probabilities

    predictor = make_predictor(PredictOptions(mixed_precision=False, tta_flip=True), arch=arch)
    assert predictor.memory_format == torch.channels_last
    reference = build_model(predictor.spec).eval()
    reference.load_state_dict(predictor.model.state_dict())
    for image in frames((37, 45), (70, 9)):
        x = torch.from_numpy(prepare_image(image, predictor.spec))[None, None]
        with torch.inference_mode():
            expected = predict_probabilities(reference, x, predictor.spec, tta_flip=True)
            served = predictor._probabilities([image], image.shape)
        np.testing.assert_allclose(served[0], expected[0].numpy(), atol=1e-5)


_FAULTS_SCRIPT = """
import resource, torch
from backend.model.checkpoint import Checkpoint
from backend.model.networks import build_model
from backend.model.predict import Predictor, PredictOptions
from tests.support.models import tiny_spec
import numpy as np
torch.set_num_threads(1)
spec = tiny_spec()
predictor = Predictor(Checkpoint(spec, build_model(spec).state_dict()), device="cpu",
                      options=PredictOptions(mixed_precision=False))
frame = np.random.default_rng(0).integers(0, 256, (768, 768), dtype=np.uint8)
for _ in range(3):  # the heap settles over the first frames (a few thousand faults, then none)
    predictor.predict([frame])
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    predictor.predict([frame])
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2])  # the median frame
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_activations_stay_mapped_so_repeated_frames_do_not_fault_pages() -> None:
    """With glibc's defaults every large freed activation is unmapped and the next frame faults
    fresh pages in; the Predictor keeps them (``keep_freed_memory_mapped``). Page faults, not time,
    are compared (the median of five frames after three warm-up frames): the same frames in two fresh
    processes, one with the setting turned off."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def faults(keep: str) -> float:
        env = {**os.environ, "SONOSEG_KEEP_FREED_MEMORY": keep, "PYTHONPATH": str(root)}
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT],
            check=False,
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[-1])

    default, kept = faults("0"), faults("1")
    assert default > 1000, default  # the frame's activations are tens of MiB: glibc unmaps them
    assert kept < default / 5, (kept, default)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    dim=st.integers(0, 3),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_class_argmax_is_torch_argmax(shape: list[int], dim: int, ties: bool, seed: int) -> None:
    """The fast form returns exactly what ``argmax(dim)`` does, ties (first maximum) included."""
    from backend.model.inference import class_argmax

    dim = dim % len(shape)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, shape, generator=gen).float() if ties else torch.randn(shape, generator=gen)
    torch.testing.assert_close(class_argmax(x, dim), x.argmax(dim), rtol=0, atol=0)

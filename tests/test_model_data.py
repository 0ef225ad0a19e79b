"""Data loading, preprocessing, patch sampling, augmentation and losses."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.errors import InvalidImage, InvalidInput
from backend.model.augment import AugmentConfig, Augmenter
from backend.model.data import (
    PatchSampler,
    TrainData,
    load_pairs_from_dirs,
    normalize_image,
    prepare_case,
    split_validation,
)
from backend.model.image_files import read_mask, write_png
from backend.model.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    deep_supervision_weights,
)
from backend.model.spec import Normalization
from backend.model.synthetic import make_blob_pairs
from tests.support.models import tiny_spec

torch.set_num_threads(1)


spec = tiny_spec


def write_palette_png(path: Path, indices: np.ndarray, palette: list[tuple[int, int, int]]) -> None:
    """A minimal 8-bit palette PNG, the format LabelMe-style tools write masks in."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = indices.shape
    raw = b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in indices)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
    png += chunk(b"PLTE", bytes(np.array(palette, np.uint8).ravel())) + chunk(b"IDAT", zlib.compress(raw))
    path.write_bytes(png + chunk(b"IEND", b""))


def test_palette_masks_read_as_class_indices(tmp_path: Path) -> None:
    indices = np.array([[0, 1, 2], [2, 1, 0]])
    path = tmp_path / "m.png"
    write_palette_png(path, indices, [(0, 0, 0), (128, 0, 0), (0, 128, 0)])
    np.testing.assert_array_equal(read_mask(path), indices)
    # A used colour that several palette indices share is ambiguous: refused, never guessed.
    write_palette_png(path, np.array([[0, 2]]), [(0, 0, 0), (9, 9, 9), (9, 9, 9)])
    with pytest.raises(InvalidImage, match="ambiguous"):
        read_mask(path)


def test_binary_255_masks_mean_class_one_and_colour_masks_are_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "b.png", np.array([[0, 255], [255, 0]], np.uint8))
    np.testing.assert_array_equal(read_mask(tmp_path / "b.png"), [[0, 1], [1, 0]])
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (200, 10, 10)
    write_png(tmp_path / "c.png", colour)
    with pytest.raises(InvalidImage, match="palette"):
        read_mask(tmp_path / "c.png")


def test_load_pairs_from_dirs_pairs_by_stem(tmp_path: Path) -> None:
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    for i, (image, mask) in enumerate(make_blob_pairs(3, (20, 24), 2)):
        write_png(tmp_path / "i" / f"f{i}.png", image)
        if i != 1:  # f1 has no mask: skipped
            write_png(tmp_path / "m" / f"f{i}.png", mask.astype(np.uint8))
    data = load_pairs_from_dirs(tmp_path / "i", tmp_path / "m")
    assert data.names == ["f0", "f2"] and data.classes == ("class_1", "class_2")
    assert data.pairs[0][0].shape == (20, 24) and data.pairs[0][1].max() == 2
    with pytest.raises(InvalidInput, match="outside 0..1"):
        load_pairs_from_dirs(tmp_path / "i", tmp_path / "m", ["Nerve"])


def test_train_data_validates_pairs() -> None:
    image = np.zeros((4, 4), np.uint8)
    with pytest.raises(InvalidInput, match="differs"):
        TrainData([(image, np.zeros((4, 5), int))], ("a",))
    with pytest.raises(InvalidInput, match="uint8"):
        TrainData([(image.astype(float), np.zeros((4, 4), int))], ("a",))


def test_split_is_seeded_and_keeps_a_training_image() -> None:
    train, val = split_validation(10, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split_validation(10, 0.2, seed=3) == (train, val)
    assert split_validation(1, 0.5, seed=0) == ([0], [])


def test_normalisation_schemes() -> None:
    image = np.array([[0, 10], [20, 30]], np.uint8)
    z = normalize_image(image, Normalization())
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-5
    d = normalize_image(image, Normalization("zscore_dataset", mean=10.0, std=5.0))
    np.testing.assert_allclose(d, [[-2, 0], [2, 4]])
    assert not np.isnan(normalize_image(np.full((3, 3), 7, np.uint8), Normalization())).any()


def test_forced_foreground_patches_contain_foreground() -> None:
    image = np.zeros((64, 64), np.uint8)
    mask = np.zeros((64, 64), np.int64)
    mask[50:52, 3:5] = 2  # a tiny vessel in a corner
    case = prepare_case((image, mask), spec())
    sampler = PatchSampler([case], (16, 16), batch_size=3, oversample_foreground=0.34, rng=np.random.default_rng(0))
    assert sampler.n_random == 2
    for _ in range(20):
        _, masks = sampler.sample()
        assert (masks[2] == 2).any()  # the last patch of every batch is forced


def test_cases_smaller_than_the_patch_are_padded_as_background() -> None:
    image = np.full((10, 12), 200, np.uint8)
    mask = np.ones((10, 12), np.int64)
    case = prepare_case((image, mask), spec())
    sampler = PatchSampler([case], (16, 16), batch_size=1, oversample_foreground=0.0, rng=np.random.default_rng(0))
    images, masks = sampler.sample()
    assert images.shape == (1, 1, 16, 16) and masks.sum() == 120 and masks[0, 0, 0] == 0


def test_augmentation_never_flips_depth_and_keeps_labels_valid() -> None:
    gen = torch.Generator().manual_seed(0)
    only_flip = AugmentConfig(
        p_rotate=0, p_scale=0, p_brightness=0, p_contrast=0, p_gamma=0, p_noise=0, p_blur=0, p_low_resolution=0
    )
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(8, 1, 1, 1)
    m = torch.arange(16).reshape(1, 4, 4).repeat(8, 1, 1) % 3
    outs, masks = Augmenter(only_flip, gen)(x, m)
    for out, mask in zip(outs, masks, strict=True):
        assert torch.equal(out[0], x[0, 0]) or torch.equal(out[0], x[0, 0].flip(-1))  # left-right only
        assert torch.equal(mask, m[0]) or torch.equal(mask, m[0].flip(-1))
    full = Augmenter(AugmentConfig(p_rotate=1, p_scale=1, p_noise=1, p_blur=1, p_gamma=1, p_low_resolution=1), gen)
    outs, masks = full(torch.randn(4, 1, 32, 32), torch.randint(0, 3, (4, 32, 32)))
    assert outs.shape == (4, 1, 32, 32) and torch.isfinite(outs).all()
    assert masks.dtype == torch.long and set(masks.unique().tolist()) <= {0, 1, 2}


def test_dice_ce_loss_is_low_for_right_answers_and_deep_supervision_weights() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    right = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 20 - 10
    loss = DiceCELoss()
    assert float(loss(right, target)) < 0.01 < float(loss(-right, target))
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    ds = DeepSupervisionLoss(loss, 3)
    low = torch.nn.functional.interpolate(right, size=(4, 4))
    assert float(ds([right, low, low], target)) < 0.05

"""``sonoseg model`` train / evaluate / predict on tiny generated PNG folders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from backend.model import spec as spec_module
from backend.model.image_files import read_image, read_mask, write_png
from backend.model.spec import ModelSpec
from backend.model.synthetic import make_blob_pairs
from cli.model_cmd import model

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def tiny(classes: tuple[str, ...]) -> ModelSpec:
        return ModelSpec(
            arch="umamba_bot_2d",
            classes=classes,
            features=(8, 16, 32),
            encoder_blocks=(1, 1, 1),
            decoder_blocks=(1, 1),
            patch_size=(32, 32),
            full_resolution_skip=True,
        )

    monkeypatch.setitem(spec_module.PRESETS, "tiny", tiny)
    yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pngs")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
    for i, (image, mask) in enumerate(make_blob_pairs(10, (32, 32), 2, seed=4)):
        write_png(root / "images" / f"{i:03d}.png", image)
        write_png(root / "masks" / f"{i:03d}.png", mask.astype(np.uint8))
    return root


TRAIN_ARGS = ["--preset", "tiny", "--epochs", "3", "--iterations", "6", "--batch-size", "4", "--device", "cpu"]


def test_train_evaluate_predict_end_to_end(folders: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ckpt = tmp_path / "m.safetensors"
    result = runner.invoke(
        model,
        [
            "train",
            "--images",
            str(folders / "images"),
            "--masks",
            str(folders / "masks"),
            "--out",
            str(ckpt),
            "--labels",
            "Nerve,Vessel",
            *TRAIN_ARGS,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "sha256=" in result.output and "validation foreground Dice" in result.output and ckpt.exists()

    result = runner.invoke(
        model,
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--images",
            str(folders / "images"),
            "--masks",
            str(folders / "masks"),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) >= {"mIoU", "mDice", "accuracy", "per_class"}
    assert set(report["per_class"]) == {"Nerve", "Vessel"}
    assert 0.0 <= report["mDice"] <= 1.0 and report["accuracy"] > 0.5

    result = runner.invoke(
        model,
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--images",
            str(folders / "images"),
            "--masks",
            str(folders / "masks"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0 and "foreground mDice" in result.output

    out = tmp_path / "pred"
    images = [str(folders / "images" / "000.png"), str(folders / "images" / "001.png")]
    result = runner.invoke(model, ["predict", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", *images])
    assert result.exit_code == 0, result.output
    mask = read_mask(out / "000_mask.png")
    assert mask.shape == (32, 32) and mask.max() <= 2
    overlay = read_image(out / "000_overlay.png")
    assert overlay.shape == (32, 32)
    assert sorted(p.name for p in out.iterdir()) == [
        "000_mask.png",
        "000_overlay.png",
        "001_mask.png",
        "001_overlay.png",
    ]


def test_errors_become_click_exceptions(folders: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    result = runner.invoke(
        model, ["predict", "--checkpoint", str(bad), "--out", str(tmp_path), str(folders / "images" / "000.png")]
    )
    assert result.exit_code == 1 and "Error: checkpoint" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        model,
        [
            "train",
            "--images",
            str(folders / "images"),
            "--masks",
            str(folders / "masks"),
            "--out",
            str(tmp_path / "x"),
            "--labels",
            "Nerve",
            *TRAIN_ARGS,
        ],
    )
    assert result.exit_code == 1 and "outside 0..1" in result.output
    result = runner.invoke(
        model,
        [
            "train",
            "--images",
            str(folders / "images"),
            "--masks",
            str(folders / "masks"),
            "--out",
            str(tmp_path / "x"),
            "--preset",
            "nope",
        ],
    )
    assert result.exit_code == 1 and "unknown model preset" in result.output

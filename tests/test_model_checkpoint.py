"""Checkpoints: round trip, sha256, and refusal of corrupt or mismatched files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backend.errors import CheckpointError
from backend.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from backend.model.networks import build_model
from backend.model.spec import Normalization
from tests.support.models import tiny_spec

torch.set_num_threads(1)


# Dataset statistics rather than the default per-image scheme, so normalisation round-trips are visible.
DATASET_STATS = Normalization("zscore_dataset", mean=50.0, std=10.0)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, str, Checkpoint]:
    spec = tiny_spec(normalization=DATASET_STATS)
    torch.manual_seed(0)
    ckpt = Checkpoint(spec, build_model(spec).state_dict(), summary={"epochs": 3}, metrics={"val_fg_dice": 0.5})
    path = tmp_path / "m.safetensors"
    return path, save_checkpoint(path, ckpt), ckpt


def test_round_trip_restores_weights_spec_and_metadata(saved: tuple[Path, str, Checkpoint]) -> None:
    path, sha, original = saved
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_checkpoint(path, expected_sha256=sha, expected_spec=original.spec)
    assert loaded.spec == original.spec and loaded.sha256 == sha
    assert loaded.summary == {"epochs": 3} and loaded.metrics == {"val_fg_dice": 0.5}
    for name, tensor in original.state_dict.items():
        torch.testing.assert_close(loaded.state_dict[name], tensor)
    x = torch.randn(1, 1, 16, 16)
    reference = build_model(original.spec).eval()
    reference.load_state_dict(original.state_dict)
    with torch.no_grad():
        torch.testing.assert_close(loaded.build()(x), reference(x))
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_wrong_sha_is_refused(saved: tuple[Path, str, Checkpoint]) -> None:
    path, _, _ = saved
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, expected_sha256="0" * 64)


@pytest.mark.parametrize("where", ["header", "tensors", "truncated"])
def test_corrupt_bytes_are_refused(saved: tuple[Path, str, Checkpoint], where: str) -> None:
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if where == "header":
        data[8 + n // 2] = ord("}")
    elif where == "tensors":
        del data[-100:]
    else:
        data = data[:5]
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_mismatched_architecture_or_classes_are_refused(saved: tuple[Path, str, Checkpoint]) -> None:
    path, _, original = saved
    with pytest.raises(CheckpointError, match="classes"):
        load_checkpoint(path, expected_spec=original.spec.with_classes(("Nerve",)))
    with pytest.raises(CheckpointError, match="arch"):
        load_checkpoint(path, expected_spec=dataclasses.replace(original.spec, arch="resunet_2d"))


def test_weights_that_do_not_fit_the_stored_spec_are_refused(tmp_path: Path) -> None:
    spec = tiny_spec(normalization=DATASET_STATS)
    wider = dataclasses.replace(spec, features=(4, 8, 32))
    path = tmp_path / "lie.safetensors"
    save_checkpoint(path, Checkpoint(spec, build_model(wider).state_dict()))  # spec says 16, tensors say 32
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(path)
    # The Mamba layer dropped: an arch claim the tensors do not support.
    plain = build_model(dataclasses.replace(spec, arch="resunet_2d")).state_dict()
    save_checkpoint(path, Checkpoint(spec, plain))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


def test_foreign_safetensors_and_unknown_arch_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks metadata"):
        load_checkpoint(foreign)
    spec = tiny_spec(normalization=DATASET_STATS)
    path = tmp_path / "arch.safetensors"
    meta = {
        "format": "sonoseg-checkpoint",
        "format_version": "1",
        "spec": spec.to_json().replace("umamba_bot_2d", "vit"),
        "summary": "{}",
        "metrics": json.dumps({}),
    }
    save_file({"w": torch.zeros(2)}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.safetensors")

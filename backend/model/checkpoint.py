"""Model checkpoints: one safetensors file, written atomically, identified by its sha256.

Layout: the tensors are the network's state dict; the safetensors metadata (string to string)
holds ``format`` ("sonoseg-checkpoint"), ``format_version``, ``spec`` (the
:class:`~backend.model.spec.ModelSpec` as JSON: architecture, class map, normalisation), and
``summary`` / ``metrics`` (JSON objects from training). safetensors cannot execute code on load,
unlike pickle, which matters for files that move between machines.

Loading checks, in order: sha256 (when the caller knows it), the safetensors header, the required
metadata, the spec (and that it equals ``expected_spec`` when given), then that every tensor name
and shape matches a freshly built network for that spec. Any failure is a
:class:`~backend.errors.CheckpointError` saying which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backend.errors import CheckpointError, SonosegError
from backend.model.networks import build_model
from backend.model.spec import ModelSpec
from backend.storage.atomic import write_atomic

log = logging.getLogger(__name__)

FORMAT = "sonoseg-checkpoint"
FORMAT_VERSION = "1"
_REQUIRED = ("format", "format_version", "spec", "summary", "metrics")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded (or to-be-saved) checkpoint. ``summary`` and ``metrics`` must be JSON-serialisable."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    def build(self) -> torch.nn.Module:
        """The network with these weights, in eval mode, on the CPU."""
        model = build_model(self.spec)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> str:
    """Write ``checkpoint`` to ``path`` atomically (temp file, fsync, rename); return its sha256."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in checkpoint.state_dict.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": checkpoint.spec.to_json(),
        "summary": json.dumps(checkpoint.summary, sort_keys=True),
        "metrics": json.dumps(checkpoint.metrics, sort_keys=True),
    }
    data = save(tensors, metadata=metadata)
    write_atomic(path, data)
    digest = hashlib.sha256(data).hexdigest()
    log.info("checkpoint written: %s sha256=%s (%d bytes)", path, digest, len(data))
    return digest


def load_checkpoint(
    path: Path, *, expected_sha256: str | None = None, expected_spec: ModelSpec | None = None
) -> Checkpoint:
    """Read and validate a checkpoint; raises :class:`CheckpointError` on any mismatch or damage."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise CheckpointError(
            f"checkpoint {path} has sha256 {digest}, expected {expected_sha256}: file changed or corrupt"
        )
    metadata = _read_metadata(data, path)
    missing = [k for k in _REQUIRED if k not in metadata]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks metadata {', '.join(missing)}: not a sonoseg checkpoint")
    if metadata["format"] != FORMAT or metadata["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is format {metadata['format']!r} v{metadata['format_version']}, "
            f"this sonoseg reads {FORMAT!r} v{FORMAT_VERSION}"
        )
    try:
        spec = ModelSpec.from_json(metadata["spec"])
        summary = json.loads(metadata["summary"])
        metrics = json.loads(metadata["metrics"])
    except (SonosegError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {exc}") from exc
    if expected_spec is not None and spec != expected_spec:
        raise CheckpointError(f"checkpoint {path} does not match the expected model: {_spec_diff(spec, expected_spec)}")
    state = _read_tensors(data, path)
    _check_against_network(spec, state, path)
    return Checkpoint(spec=spec, state_dict=state, summary=summary, metrics=metrics, sha256=digest)


def _read_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (8-byte little-endian length + JSON)."""
    if len(data) < 8:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 * 1024 * 1024:
        raise CheckpointError(f"checkpoint {path} has a corrupt header (length {n}): not a safetensors file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has a corrupt header: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has no metadata: not a sonoseg checkpoint")
    return {str(k): str(v) for k, v in meta.items()}


def _read_tensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} has corrupt tensor data: {exc}") from exc


def _check_against_network(spec: ModelSpec, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        reference = build_model(spec).state_dict()
    except SonosegError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc.message}") from exc
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit architecture {spec.arch}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, ref in reference.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} has shape {tuple(state[name].shape)}, "
                f"the spec needs {tuple(ref.shape)}"
            )


def _spec_diff(got: ModelSpec, want: ModelSpec) -> str:
    a, b = json.loads(got.to_json()), json.loads(want.to_json())
    diffs = [f"{k}={a.get(k)!r} (expected {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs)

"""The Predictor: load a checkpoint once, turn natural-size frames into masks with confidences.

Pipeline per frame: resample by ``spec.input_scale`` and z-score (shared with training, see
:func:`backend.model.data.prepare_image`), network-grid probabilities
(:func:`backend.model.inference.predict_probabilities`: padding or sliding window, optional
left-right TTA, mixed precision by default: see :func:`backend.model.device.mixed_precision_dtype`),
bilinear back to the frame's natural size, argmax, optional keep-largest-component.
Frames of equal size are stacked into one batch (up to ``batch_size``).

Scores (all in [0, 1]):

- ``score``: mean, over the pixels predicted as foreground, of the winning class probability; when
  nothing is predicted, the mean background probability over the frame (how sure "empty" is).
  This is the per-region score Label Studio shows.
- ``uncertainty_map``: per-pixel entropy of the class distribution divided by log(num_classes).
- ``uncertainty``: mean of that map over the candidate region, i.e. pixels where any foreground
  class has probability >= 0.05 (0.0 when there are none). Averaging over the whole frame would
  let the confidently-background majority drown the signal that active learning ranks by.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from backend.errors import InvalidImage
from backend.model.checkpoint import Checkpoint, load_checkpoint
from backend.model.data import prepare_image
from backend.model.device import inference_memory_format, keep_freed_memory_mapped, resolve_device
from backend.model.inference import DEFAULT_MAX_WHOLE_PIXELS, predict_probabilities
from backend.model.resample import resize_probabilities
from backend.model.spec import ModelSpec

log = logging.getLogger(__name__)

CANDIDATE_PROBABILITY = 0.05


@dataclass(frozen=True, eq=False)
class PredictionResult:
    """One frame's prediction at its natural size; see the module docstring for the scores."""

    probabilities: NDArray[np.float32]  # float32 (num_classes, H, W), sums to 1 over classes
    mask: NDArray[np.uint8]  # uint8 (H, W) class indices, 0 = background
    score: float
    uncertainty_map: NDArray[np.float32]  # float32 (H, W) in [0, 1]
    uncertainty: float
    class_names: tuple[str, ...]  # indexed by mask value


@dataclass(frozen=True)
class PredictOptions:
    tta_flip: bool = False
    keep_largest_component: bool = False
    batch_size: int = 4
    max_whole_pixels: int = DEFAULT_MAX_WHOLE_PIXELS
    mixed_precision: bool = True


class Predictor:
    """Holds one network in eval mode; ``predict`` is thread-compatible but not parallel."""

    def __init__(self, checkpoint: Checkpoint, *, device: str = "auto", options: PredictOptions | None = None) -> None:
        self.spec: ModelSpec = checkpoint.spec
        self.sha256 = checkpoint.sha256
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory_mapped()
        self.options = options or PredictOptions()
        self.memory_format = inference_memory_format(self.device)
        self.model = checkpoint.build().to(self.device)
        self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # missing from torch's stubs

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        expected_sha256: str | None = None,
        device: str = "auto",
        options: PredictOptions | None = None,
    ) -> Predictor:
        return cls(load_checkpoint(path, expected_sha256=expected_sha256), device=device, options=options)

    def predict(self, images: Sequence[NDArray[Any]]) -> list[PredictionResult]:
        """uint8 (H, W) frames of any sizes -> one result per frame, in order."""
        for i, image in enumerate(images):
            if image.ndim != 2 or image.dtype != np.uint8 or min(image.shape) < 1:
                raise InvalidImage(
                    f"image {i}: expected a non-empty uint8 (H, W) frame, got {image.dtype} {image.shape}"
                )
        results: list[PredictionResult | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault((image.shape[0], image.shape[1]), []).append(i)
        bs = max(1, self.options.batch_size)
        with torch.inference_mode():
            for size, indices in groups.items():
                for start in range(0, len(indices), bs):
                    chunk = indices[start : start + bs]
                    probs = self._probabilities([images[i] for i in chunk], size)
                    for i, p in zip(chunk, probs, strict=True):
                        results[i] = self._result(p)
        return [r for r in results if r is not None]

    def _probabilities(self, images: list[NDArray[Any]], size: tuple[int, int]) -> NDArray[Any]:
        batch = np.stack([prepare_image(im, self.spec) for im in images])[:, None]
        x = torch.from_numpy(batch).to(self.device)
        probs = predict_probabilities(
            self.model,
            x,
            self.spec,
            tta_flip=self.options.tta_flip,
            max_whole_pixels=self.options.max_whole_pixels,
            mixed_precision=self.options.mixed_precision,
            memory_format=self.memory_format,
        )
        return resize_probabilities(probs, size).cpu().numpy()

    def _result(self, probs: NDArray[Any]) -> PredictionResult:
        mask = probs.argmax(0).astype(np.uint8)
        if self.options.keep_largest_component:
            mask = keep_largest_component(mask, self.spec.num_classes)
        entropy = normalized_entropy(probs)
        return PredictionResult(
            probabilities=probs.astype(np.float32, copy=False),
            mask=mask,
            score=frame_score(probs, mask),
            uncertainty_map=entropy,
            uncertainty=region_uncertainty(probs, entropy),
            class_names=self.spec.class_names,
        )


def keep_largest_component(mask: NDArray[Any], num_classes: int) -> NDArray[Any]:
    """Per foreground class, keep the largest 8-connected component; the rest becomes background."""
    out = mask.copy()
    for cls in range(1, num_classes):
        labels, n = ndimage.label(mask == cls, structure=np.ones((3, 3), bool))
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            out[(labels > 0) & (labels != int(sizes.argmax()) + 1)] = 0
    return out


def normalized_entropy(probs: NDArray[Any]) -> NDArray[np.float32]:
    """(C, H, W) probabilities -> (H, W) entropy / log(C), in [0, 1]."""
    p = np.clip(probs, 1e-12, 1.0)
    ent = -(p * np.log(p)).sum(0) / math.log(probs.shape[0])
    out: NDArray[np.float32] = np.clip(ent, 0.0, 1.0).astype(np.float32)
    return out


def frame_score(probs: NDArray[Any], mask: NDArray[Any]) -> float:
    fg = mask > 0
    if fg.any():
        return float(probs.max(0)[fg].mean())
    return float(probs[0].mean())


def region_uncertainty(probs: NDArray[Any], entropy: NDArray[Any]) -> float:
    region = probs[1:].max(0) >= CANDIDATE_PROBABILITY
    if not region.any():
        return 0.0
    return float(entropy[region].mean())

"""Per-image acquisition scores and a compact embedding, computed by the serving model.

What active learning (:mod:`backend.active_learning`) ranks unlabelled frames by. Stored per
model version by the services (recomputed after a promotion), so a ranking never mixes the
opinions of two models.

Every frame goes through the network twice, as it is and mirrored left-right (the mirror's
probabilities are mirrored back), the same preprocessing and batching as
:meth:`backend.model.predict.Predictor.predict`. The scores are computed on the network grid (after
``spec.input_scale``), where the model sees the frame, so they do not depend on the frame's natural
size; ``p`` is the plain pass, ``q`` the mirrored one, ``m = (p + q) / 2`` their mean:

- ``entropy``: :func:`~backend.model.predict.region_uncertainty` of ``m``: the mean normalised
  entropy over the candidate region (any foreground class at probability >= 0.05), the same
  definition as the ``uncertainty`` every prediction stores.
- ``tta_disagreement``: the mean, over the union of both passes' candidate regions, of the total
  variation distance ``0.5 * sum_c |p_c - q_c|`` between the two passes (0 = the mirror changes
  nothing, 1 = the passes put all their mass on different classes). Chosen over ``1 - Dice`` of
  the two argmax masks because that is unstable for small objects (a two-pixel nerve flips between
  0 and 1) and blind to a change of confidence that does not move the argmax.
- ``boundary_uncertainty``: the mean normalised entropy of ``m`` in a band of
  :data:`BOUNDARY_RADIUS` network pixels on both sides of every predicted object's outline (the
  argmax of ``m``, per foreground class; the frame's own edge is not an outline). Where the model
  is unsure where the nerve ends is what a sonographer's correction fixes. 0 when nothing is
  predicted.
- ``foreground_fraction``: the share of network-grid pixels whose argmax of ``m`` is a foreground
  class.
- ``embedding``: the global-average-pooled output of the deepest encoder stage (the bottleneck,
  captured with a forward hook; sliding-window tiles averaged), averaged over the two passes and
  L2-normalised to float32. Averaging the mirror in makes it flip-invariant: training mirrors frames
  left-right (:mod:`backend.model.augment`), so a mirrored frame teaches nothing new and should
  look like a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from backend.errors import InvalidImage, InvalidInput

if TYPE_CHECKING:
    import torch
    from torch import nn

    from backend.model.predict import Predictor

BOUNDARY_RADIUS = 2  # network-grid pixels on each side of a predicted outline


@dataclass(frozen=True, eq=False)
class ImageScores:
    """One frame's scores (each in [0, 1]) and its L2-normalised float32 embedding."""

    entropy: float
    tta_disagreement: float
    boundary_uncertainty: float
    foreground_fraction: float
    embedding: NDArray[np.float32]


def score_images(predictor: Predictor, images: Sequence[NDArray[Any]]) -> list[ImageScores]:
    """uint8 (H, W) frames of any sizes -> one :class:`ImageScores` per frame, in order."""
    import torch

    from backend.model.data import prepare_image
    from backend.model.inference import predict_probabilities

    for i, image in enumerate(images):
        if image.ndim != 2 or image.dtype != np.uint8 or min(image.shape) < 1:
            raise InvalidImage(f"image {i}: expected a non-empty uint8 (H, W) frame, got {image.dtype} {image.shape}")
    spec, options, model = predictor.spec, predictor.options, predictor.model
    results: list[ImageScores | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((image.shape[0], image.shape[1]), []).append(i)
    pooled: list[torch.Tensor] = []

    def capture(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        pooled.append(output.detach().float().mean(dim=(-2, -1)))

    handle = bottleneck_module(model).register_forward_hook(capture)
    bs = max(1, options.batch_size)
    try:
        with torch.inference_mode():
            for indices in groups.values():
                for start in range(0, len(indices), bs):
                    chunk = indices[start : start + bs]
                    batch = np.stack([prepare_image(images[i], spec) for i in chunk])[:, None]
                    x = torch.from_numpy(batch).to(predictor.device)

                    def run(inp: torch.Tensor) -> tuple[NDArray[Any], NDArray[Any]]:
                        pooled.clear()
                        probs = predict_probabilities(
                            model,
                            inp,
                            spec,
                            max_whole_pixels=options.max_whole_pixels,
                            mixed_precision=options.mixed_precision,
                            memory_format=predictor.memory_format,
                        )
                        feats = torch.stack(pooled).mean(0)  # (B, C): tiles averaged
                        return probs.cpu().numpy(), feats.cpu().numpy()

                    p, emb_p = run(x)
                    q, emb_q = run(x.flip(-1))
                    q = q[..., ::-1]
                    for j, i in enumerate(chunk):
                        results[i] = frame_scores(p[j], q[j], 0.5 * (emb_p[j] + emb_q[j]))
    finally:
        handle.remove()
    return [r for r in results if r is not None]


def bottleneck_module(model: nn.Module) -> nn.Module:
    """The deepest encoder stage of a U-Mamba / residual U-Net (``model.encoder.stages[-1]``)."""
    from torch import nn

    stages = getattr(getattr(model, "encoder", None), "stages", None)
    if not isinstance(stages, nn.ModuleList) or len(stages) == 0:
        raise InvalidInput(f"{type(model).__name__} has no encoder stages to take an embedding from")
    last: nn.Module = stages[-1]
    return last


def frame_scores(p: NDArray[Any], q: NDArray[Any], pooled: NDArray[Any]) -> ImageScores:
    """Scores of one frame from its plain and mirrored-back (C, h, w) probabilities and its pooled
    bottleneck features (see the module docstring)."""
    from backend.model.predict import CANDIDATE_PROBABILITY, normalized_entropy, region_uncertainty

    p = p.astype(np.float32, copy=False)
    q = q.astype(np.float32, copy=False)
    mean = 0.5 * (p + q)
    entropy_map = normalized_entropy(mean)
    region = (p[1:].max(0) >= CANDIDATE_PROBABILITY) | (q[1:].max(0) >= CANDIDATE_PROBABILITY)
    tta = float((0.5 * np.abs(p - q).sum(0))[region].mean()) if region.any() else 0.0
    mask = mean.argmax(0)
    band = boundary_band(mask, mean.shape[0], BOUNDARY_RADIUS)
    boundary = float(entropy_map[band].mean()) if band.any() else 0.0
    return ImageScores(
        entropy=_unit(region_uncertainty(mean, entropy_map)),
        tta_disagreement=_unit(tta),
        boundary_uncertainty=_unit(boundary),
        foreground_fraction=_unit(float((mask > 0).mean())),
        embedding=unit_vector(pooled),
    )


def boundary_band(mask: NDArray[Any], num_classes: int, radius: int) -> NDArray[np.bool_]:
    """Pixels within ``radius`` (chessboard distance) of an outline of a foreground class of ``mask``."""
    from scipy import ndimage

    square = np.ones((3, 3), bool)
    band = np.zeros(mask.shape, bool)
    for cls in range(1, num_classes):
        inside = mask == cls
        if not inside.any():
            continue
        grown = ndimage.binary_dilation(inside, square, iterations=radius)
        shrunk = ndimage.binary_erosion(inside, square, iterations=radius, border_value=1)
        band |= grown & ~shrunk
    return band


def unit_vector(v: NDArray[Any]) -> NDArray[np.float32]:
    """``v`` as float32 with L2 norm 1 (a zero vector becomes the uniform unit vector)."""
    x = np.asarray(v, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(x))
    if not np.isfinite(norm) or norm < 1e-12:
        x = np.ones_like(x)
        norm = float(np.sqrt(x.size))
    out: NDArray[np.float32] = (x / norm).astype(np.float32)
    return out


def _unit(value: float) -> float:
    return float(min(max(value, 0.0), 1.0)) if np.isfinite(value) else 0.0

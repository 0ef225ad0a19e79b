"""The planner: a dataset's fingerprint and a preset in, the network plan out, with its reasons.

A preset is a starting point, not a geometry. What it fixes is the *architecture family and the
compute budget*: its patch area (``cpu_small``: a 256x256 grid, what 2 CPU threads train and
serve in time) and its pixels per training step (patch area x batch). What the planner derives
from the data, one decision at a time (every decision is recorded as a line of text that
``sonoseg model plan`` prints and the checkpoint keeps):

1. **Input scale**: the frame is resampled so that the median frame fills the preset's grid
   budget (``sqrt(budget / median area)``, never above 1: upsampling adds pixels, not
   information). Then the objects decide: if the smallest class's small objects (the 10th
   percentile of each image's largest component) would shrink below :data:`MIN_OBJECT_DIAMETER`
   grid pixels, the scale is raised (up to 1) until they do not.
2. **Stages**: enough stride-2 steps that the bottleneck is about :data:`TARGET_BOTTLENECK` pixels
   on the short side of the grid frame (the Mamba layer then scans a few dozen tokens), within
   the preset's maximum.
3. **Patch**: when the grid frame fits the patch budget, the patch is the whole frame padded to a
   multiple of the divisor, symmetrically and with zeros, exactly as inference pads it
   (:func:`backend.model.inference.pad_to_multiple`): training then sees what inference sees. A
   larger frame is trained on crops inside it (never padded) and predicted whole.
4. **Batch**: the preset's pixels per step divided by the patch area (at least 2).
5. **Normalisation**: per-image z-score (nnU-Net's choice for non-CT data): ultrasound gain and
   dynamic range differ between machines and sonographers; the fingerprint's spread of per-image
   means is reported.

Nothing here assumes a frame size. Pure: no torch, no files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from backend.errors import InvalidInput
from backend.model.fingerprint import DatasetFingerprint
from backend.model.spec import ModelSpec, Normalization, preset_spec

MIN_OBJECT_DIAMETER = 12.0
"""Grid pixels across a small object (of the smallest class) below which the scale is raised."""

TARGET_BOTTLENECK = 8
"""Bottleneck short side, in pixels, the number of stages aims for."""

MIN_STAGES = 3
PATCH_BUDGET_FACTOR = 1.6
"""A grid frame up to this many times the preset's patch area is trained whole (padded like
inference); beyond it, on crops of the preset's patch area."""


@dataclass(frozen=True)
class Plan:
    """A network plan for one dataset: the spec to train and serve, the batch, and why."""

    spec: ModelSpec
    batch_size: int
    grid_size: tuple[int, int]  # the median frame on the network grid (height, width)
    whole_frame_patches: bool
    decisions: tuple[str, ...]
    preset: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "input_scale": self.spec.input_scale,
            "patch_size": list(self.spec.patch_size),
            "stages": self.spec.n_stages,
            "features": list(self.spec.features),
            "batch_size": self.batch_size,
            "grid_size": list(self.grid_size),
            "whole_frame_patches": self.whole_frame_patches,
            "normalization": self.spec.normalization.scheme,
            "decisions": list(self.decisions),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def plan_network(fp: DatasetFingerprint, preset: str, classes: tuple[str, ...], base_batch: int) -> Plan:
    """Derive the plan for ``fp`` from ``preset`` (its spec and its recommended batch size)."""
    if base_batch < 1:
        raise InvalidInput(f"batch size must be >= 1, got {base_batch}")
    base = preset_spec(preset, classes)
    decisions: list[str] = []
    h, w = fp.median_size
    budget = base.patch_size[0] * base.patch_size[1]
    decisions.append(
        f"data: {fp.n_images} frames, median {w}x{h} (width x height), {fp.distinct_sizes} distinct size(s), "
        f"sizes {fp.min_size[1]}x{fp.min_size[0]} to {fp.max_size[1]}x{fp.max_size[0]}"
    )
    if fp.spacing is not None and not math.isclose(fp.spacing[0], fp.spacing[1], rel_tol=0.05):
        decisions.append(
            f"pixel spacing {fp.spacing[0]:.3g} x {fp.spacing[1]:.3g} mm is anisotropic; "
            "one scale is still used for both axes (the network's grid keeps the frame's aspect)"
        )
    else:
        decisions.append(
            "pixel spacing "
            + ("unknown" if fp.spacing is None else f"{fp.spacing[0]:.3g} mm, isotropic")
            + ": one scale for both axes"
        )

    scale = min(1.0, math.sqrt(budget / float(h * w)))
    decisions.append(
        f"input scale {scale:.3f}: the {preset} preset's compute budget is a {base.patch_size[1]}x{base.patch_size[0]} "
        f"grid ({budget} px); the median frame has {h * w} px"
        + ("" if scale < 1.0 else " (at most 1: frames are never upsampled)")
    )
    present = [c for c in fp.classes if c.images_with_class]
    if present:
        smallest = min(present, key=lambda c: c.p10_diameter)
        diameter = smallest.p10_diameter * scale
        if diameter < MIN_OBJECT_DIAMETER and scale < 1.0:
            raised = min(1.0, MIN_OBJECT_DIAMETER / max(smallest.p10_diameter, 1e-6))
            decisions.append(
                f"input scale raised {scale:.3f} -> {raised:.3f}: small {smallest.name} objects "
                f"(10th percentile {smallest.p10_area:.0f} px, {smallest.p10_diameter:.1f} px across) would be "
                f"{diameter:.1f} px across on the grid, under the {MIN_OBJECT_DIAMETER:g} px minimum"
            )
            scale = raised
        else:
            decisions.append(
                f"objects: small {smallest.name} objects are {smallest.p10_diameter * scale:.1f} px across on the "
                f"grid (10th percentile, natural {smallest.p10_diameter:.1f} px), at least {MIN_OBJECT_DIAMETER:g} "
                "px or at full resolution: no change"
            )
    else:
        decisions.append("objects: no labelled foreground yet; the scale follows the compute budget only")
    scale = min(1.0, math.ceil(scale * 10_000) / 10_000)  # 4 decimals, rounded up: never below a floor
    grid = (max(1, round(h * scale)), max(1, round(w * scale)))

    max_stages = base.n_stages
    short = min(grid)
    stages = round(math.log2(max(short / TARGET_BOTTLENECK, 1))) + 1
    stages = max(MIN_STAGES, min(max_stages, stages))
    divisor = 1 << (stages - 1)
    decisions.append(
        f"{stages} stages (divisor {divisor}): the grid frame's short side {short} px gives a "
        f"{short // divisor} px bottleneck (target {TARGET_BOTTLENECK}, preset maximum {max_stages} stages)"
    )

    padded = (_ceil_to(grid[0], divisor), _ceil_to(grid[1], divisor))
    whole = padded[0] * padded[1] <= PATCH_BUDGET_FACTOR * budget
    if whole:
        patch = padded
        decisions.append(
            f"patch {patch[1]}x{patch[0]}: the whole grid frame ({grid[1]}x{grid[0]}) padded to a multiple of "
            f"{divisor} symmetrically with zeros, as inference pads it: training sees what inference sees"
        )
    else:
        side = max(divisor, _floor_to(int(math.sqrt(budget)), divisor))
        patch = (min(side, _floor_to(grid[0], divisor) or divisor), min(side, _floor_to(grid[1], divisor) or divisor))
        decisions.append(
            f"patch {patch[1]}x{patch[0]}: crops inside the grid frame ({grid[1]}x{grid[0]} is over "
            f"{PATCH_BUDGET_FACTOR:g}x the {budget} px budget); inference runs on the whole frame"
        )
    pixels_per_step = budget * base_batch
    batch = max(min(2, base_batch), round(pixels_per_step / (patch[0] * patch[1])))
    decisions.append(f"batch {batch}: the preset's {pixels_per_step} px per step over {patch[0] * patch[1]} px patches")
    decisions.append(
        f"normalisation: per-image z-score; frames differ in gain (per-image mean {fp.intensity_mean:.1f} +- "
        f"{fp.image_mean_spread:.1f} grey levels)"
    )
    spec = dataclasses.replace(
        base,
        features=_fit(base.features, stages),
        encoder_blocks=_fit(base.encoder_blocks, stages),
        decoder_blocks=_fit_decoder(base.decoder_blocks, stages - 1),
        patch_size=patch,
        input_scale=scale,
        normalization=Normalization("zscore_image"),
    )
    return Plan(spec, batch, grid, whole, tuple(decisions), preset)


def _ceil_to(v: int, d: int) -> int:
    return int(math.ceil(v / d) * d)


def _floor_to(v: int, d: int) -> int:
    return (v // d) * d


def _fit(values: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Per-stage values for ``n`` stages: the first ``n``, or the last repeated."""
    return tuple(values[:n]) if n <= len(values) else (*values, *([values[-1]] * (n - len(values))))


def _fit_decoder(values: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Decoder blocks are listed bottleneck-first: fewer stages drop the deepest entries."""
    return tuple(values[-n:]) if n <= len(values) else (*([values[0]] * (n - len(values))), *values)

"""Training step time: sonoseg's 1x1 layers against U-Mamba's order and torch's 1x1 convolution.

Two layer changes make a CPU training step cheaper without changing the network's function or
its state dict (``tests/test_model_spec.py`` checks both equivalences):

- ``Upsample`` convolves at the lower resolution, then upsamples (U-Mamba upsamples first, then
  convolves at the skip's resolution; a 1x1 conv commutes with nearest-neighbour upsampling);
- ``PointwiseConv`` runs stride-1 1x1 convolutions of contiguous CPU tensors as one ``baddbmm``.

The baseline is the same network with both undone, in the same process: ``Upsample.forward`` put
back to interpolate-then-convolve and every ``PointwiseConv`` run through ``nn.Conv2d.forward``.
Both variants are timed interleaved (one block of steps each, in turn) on one fixed batch, with the
same weights, optimiser and loss as training (AdamW, deep-supervision Dice + CE, the CPU autocast
rule of :func:`backend.model.device.autocast`).

    .venv/bin/python bench/bench_train_step.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.model import umamba
from backend.model.device import autocast, mixed_precision_dtype
from backend.model.losses import DeepSupervisionLoss, DiceCELoss
from backend.model.networks import build_model
from backend.model.spec import preset_spec

CLASSES = ("Nerve", "Vessel")


def _reference_upsample(self: umamba.Upsample, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    out: torch.Tensor = nn.Conv2d.forward(self.conv, F.interpolate(x, size=size, mode="nearest"))
    return out


@contextlib.contextmanager
def reference_layers() -> Iterator[None]:
    """U-Mamba's upsample order and torch's 1x1 convolution, for the duration of the block."""
    saved = umamba.Upsample.forward, umamba.PointwiseConv.forward
    umamba.Upsample.forward = _reference_upsample  # type: ignore[method-assign]
    umamba.PointwiseConv.forward = nn.Conv2d.forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        umamba.Upsample.forward, umamba.PointwiseConv.forward = saved  # type: ignore[method-assign]


def step_seconds(preset: str, patch: tuple[int, int], batch: int, blocks: int, steps: int) -> tuple[float, float]:
    """Median seconds per step of (reference, sonoseg), interleaved in ``blocks`` blocks."""
    spec = dataclasses.replace(preset_spec(preset, CLASSES), patch_size=patch)
    torch.manual_seed(0)
    model = build_model(spec).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = DeepSupervisionLoss(DiceCELoss(), spec.n_stages - 1)
    x = torch.randn(batch, spec.in_channels, *patch)
    y = torch.randint(0, spec.num_classes, (batch, *patch))
    cpu = torch.device("cpu")

    def step() -> float:
        t0 = time.perf_counter()
        with autocast(cpu, True):
            loss = loss_fn(model.forward_deep_supervision(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    reference: list[float] = []
    ours: list[float] = []
    for _ in range(blocks):
        with reference_layers():
            step()  # warm-up: oneDNN primitives for this variant's shapes
            reference.extend(step() for _ in range(steps))
        step()
        ours.extend(step() for _ in range(steps))
    return statistics.median(reference), statistics.median(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per block and variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = mixed_precision_dtype(torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads, CPU autocast: {dtype}, batch {args.batch}")
    print("| preset | patch | reference ms/step | sonoseg ms/step | sonoseg / reference time | images/s |")
    print("|---|---|---:|---:|---:|---:|")
    for preset in ("cpu_small", "cpu_small_unet"):
        for patch in ((256, 288), (256, 256)):
            ref, ours = step_seconds(preset, patch, args.batch, args.blocks, args.steps)
            print(
                f"| {preset} | {patch[1]}x{patch[0]} | {ref * 1e3:.0f} | {ours * 1e3:.0f} | {ours / ref:.2f} | "
                f"{args.batch / ours:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

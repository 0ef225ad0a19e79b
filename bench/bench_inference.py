"""Inference and training speed per preset on the CPU (2 threads by default).

For each preset and a natural 256x256 / 512x512 frame: ``net`` is the network forward alone on the
frame's network grid (after ``input_scale``, padded), ``predict`` the end-to-end Predictor
(resampling, z-score, padding, network, softmax, resize back, argmax, entropy) with its default
mixed precision (bfloat16 on CPUs with native support), ``fp32`` the same with mixed precision off.
Each cell is the best of ``--repeats`` runs (the least disturbed by other processes on a shared
machine); the 512 predict median is printed too. Then training images/s (forward + backward +
optimiser step on training patches, with the training default mixed precision; augmentation
excluded). Ratios are against ``--baseline`` (default: the plain residual U-Net of the CPU preset),
measured in the same run. Random weights: speed does not depend on them.

    .venv/bin/python bench/bench_inference.py
    .venv/bin/python bench/bench_inference.py --presets cpu_small,nnunet_bot --train-presets cpu_small
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.model.checkpoint import Checkpoint
from backend.model.device import autocast, mixed_precision_dtype
from backend.model.losses import DeepSupervisionLoss, DiceCELoss
from backend.model.networks import build_model
from backend.model.predict import PredictOptions, Predictor
from backend.model.resample import scaled_size
from backend.model.spec import accepts_any_size, preset_spec

CLASSES = ("Nerve", "Vessel")


def cpu_kind() -> str:
    """What the serving target depends on: the vector ISA ATen dispatches to, whether the CPU does
    bfloat16 natively, and any cap set by ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` (with both
    set to ``avx2``/``AVX2`` a bf16-capable CPU runs the kernels of an AVX2-only one)."""
    import os

    caps = [f"ATen {torch.backends.cpu.get_cpu_capability()}"]
    caps.append("native bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no native bf16")
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        if os.environ.get(var):
            caps.append(f"{var}={os.environ[var]}")
    return ", ".join(caps)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) milliseconds of ``repeats`` calls after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return min(samples), statistics.median(samples)


def bench_inference(preset: str, repeats: int) -> dict[str, float]:
    spec = preset_spec(preset, CLASSES)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    ckpt = Checkpoint(spec, model.state_dict())
    mixed = Predictor(ckpt, device="cpu")
    fp32 = Predictor(ckpt, device="cpu", options=PredictOptions(mixed_precision=False))
    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    for side in (256, 512):
        h, w = scaled_size((side, side), spec.input_scale)
        if accepts_any_size(spec):
            x = torch.randn(1, 1, -(-h // spec.divisor) * spec.divisor, -(-w // spec.divisor) * spec.divisor)
        else:  # channel-token Enc: the Predictor tiles (and pads) frames into training patches
            x = torch.randn(1, 1, max(h, spec.patch_size[0]), max(w, spec.patch_size[1]))
        with torch.inference_mode(), autocast(torch.device("cpu"), True):
            out[f"net {side}"] = timed(lambda x=x: model(x), repeats)[0]  # type: ignore[misc]
        frame = rng.integers(0, 256, size=(side, side), dtype=np.uint8)
        best, median = timed(lambda f=frame: mixed.predict([f]), repeats)  # type: ignore[misc]
        out[f"predict {side}"] = best
        if side == 512:
            out["median 512"] = median
            out["fp32 512"] = timed(lambda f=frame: fp32.predict([f]), repeats)[0]  # type: ignore[misc]
    return out


def bench_training(preset: str, batch_size: int, steps: int) -> float:
    spec = preset_spec(preset, CLASSES)
    torch.manual_seed(0)
    model = build_model(spec).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = DeepSupervisionLoss(DiceCELoss(), spec.n_stages - 1)
    x = torch.randn(batch_size, 1, *spec.patch_size)
    y = torch.randint(0, spec.num_classes, (batch_size, *spec.patch_size))

    def step() -> None:
        with autocast(torch.device("cpu"), True):
            loss = loss_fn(model.forward_deep_supervision(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    ms = timed(step, steps)[0]
    return batch_size / (ms / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="cpu_small,cpu_small_unet,nnunet_bot,nnunet_enc")
    parser.add_argument("--train-presets", default="cpu_small,cpu_small_unet")
    parser.add_argument("--baseline", default="cpu_small_unet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    if args.baseline not in presets:
        presets.insert(0, args.baseline)
    from backend.model import scan

    scan.warmup()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats} runs, "
        f"baseline {args.baseline}; selective scan: {scan.describe_backend()}; "
        f"CPU mixed precision: {mixed_precision_dtype(torch.device('cpu'))}; "
        f"CPU kind: {cpu_kind()}"
    )

    results = {p: bench_inference(p, args.repeats) for p in presets}
    base = results[args.baseline]
    cols = list(base)
    print(f"\n{'inference ms':<16}" + "".join(f"{c:>14}" for c in cols) + f"{'ratio@512':>11}")
    for p, r in results.items():
        print(f"{p:<16}" + "".join(f"{r[c]:>14.1f}" for c in cols) + f"{r['predict 512'] / base['predict 512']:>11.2f}")

    train_presets = [p for p in args.train_presets.split(",") if p]
    if train_presets:
        if args.baseline not in train_presets:
            train_presets.insert(0, args.baseline)
        speed = {p: bench_training(p, args.batch_size, args.train_steps) for p in train_presets}
        print(f"\n{'training':<16}{'patch':>10}{'images/s':>10}{'ratio':>8}   (batch {args.batch_size})")
        for p, v in speed.items():
            patch = "x".join(map(str, preset_spec(p, CLASSES).patch_size))
            print(f"{p:<16}{patch:>10}{v:>10.2f}{v / speed[args.baseline]:>8.2f}")


if __name__ == "__main__":
    main()

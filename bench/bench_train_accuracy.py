"""Accuracy bench: U-Mamba (default preset) vs the plain residual U-Net baseline, same budget.

Both models train on usgra-seg ``images/``+``masks/`` (validation split taken from them) for the same
wall-clock budget on the same machine, one after the other; then both are evaluated ONCE on
``test/`` at natural resolution. Prints per-class Dice/IoU, foreground mDice, mIoU, accuracy and
ms/frame side by side, with ratios against the baseline; writes checkpoints, a learning-curve PNG
and overlay PNGs into ``--out``. Without the dataset it falls back to generated frames (numbers
then only prove the pipeline runs).

    .venv/bin/python bench/bench_train_accuracy.py --minutes 25 --out /tmp/acc
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.model.data import TrainData, load_pairs_from_dirs
from backend.model.image_files import write_png
from backend.model.metrics import SegmentationReport, evaluate_masks
from backend.model.overlay import overlay
from backend.model.predict import Predictor
from backend.model.synthetic import make_blob_pairs
from backend.model.train import Progress, TrainResult, train
from backend.model.train_config import training_preset

DATA = Path("/work/shared/data/usgra-seg")
CLASSES = ("Nerve", "Vessel")


def load_data(data_dir: Path) -> tuple[TrainData, TrainData, str]:
    if (data_dir / "images").is_dir() and (data_dir / "test" / "images").is_dir():
        train_data = load_pairs_from_dirs(data_dir / "images", data_dir / "masks", CLASSES)
        test_data = load_pairs_from_dirs(data_dir / "test" / "images", data_dir / "test" / "masks", CLASSES)
        return train_data, test_data, f"usgra-seg ({data_dir})"
    print(f"NOTE: {data_dir} not found, using generated frames; numbers only prove the pipeline runs")
    return (
        TrainData(make_blob_pairs(48, (256, 256), 2, seed=1), CLASSES),
        TrainData(make_blob_pairs(12, (256, 256), 2, seed=2), CLASSES),
        "synthetic",
    )


def run_one(preset: str, data: TrainData, minutes: float, seed: int, threads: int) -> tuple[TrainResult, float]:
    config = training_preset(preset).replace(max_minutes=minutes, seed=seed, num_threads=threads, device="cpu")
    print(
        f"\n== training {preset}: {minutes:g} min, {config.optimizer} lr {config.learning_rate:g}, "
        f"batch {config.batch_size} x {config.iterations_per_epoch} it/epoch",
        flush=True,
    )

    def report(p: Progress) -> None:
        val = "n/a" if p.val_dice is None else f"{p.val_dice:.3f}"
        print(
            f"  epoch {p.epoch:3d} {p.elapsed_s:6.0f}s loss {p.loss:.3f} train {p.train_dice:.3f} val {val}"
            f"{' *' if p.is_best else ''}",
            flush=True,
        )

    t0 = time.perf_counter()
    result = train(config, data, on_progress=report)
    return result, time.perf_counter() - t0


def evaluate(predictor: Predictor, test: TrainData) -> tuple[SegmentationReport, float, list[np.ndarray]]:
    images = [im for im, _ in test.pairs]
    predictor.predict(images[:1])  # warm-up
    t0 = time.perf_counter()
    preds = [predictor.predict([im])[0].mask for im in images]
    ms = (time.perf_counter() - t0) / len(images) * 1e3
    return evaluate_masks(preds, [m for _, m in test.pairs], predictor.spec.class_names), ms, preds


def save_curves(out: Path, results: dict[str, TrainResult]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no learning curve"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results.items():
        t = [p.elapsed_s / 60 for p in res.history]
        axes[0].plot(t, [p.loss for p in res.history], "o-", label=name)
        axes[1].plot(t, [p.val_dice or 0 for p in res.history], "o-", label=f"{name} val")
        axes[1].plot(t, [p.train_dice for p in res.history], "x--", label=f"{name} train")
    axes[0].set(xlabel="minutes", ylabel="loss (Dice+CE, deep supervision)", title="training loss")
    axes[1].set(xlabel="minutes", ylabel="foreground Dice", title="Dice (val: network grid)", ylim=(0, 1))
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "learning_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--minutes", type=float, default=25.0, help="training budget per model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--baseline", default="cpu_small_unet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overlays", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    train_data, test_data, source = load_data(args.data)
    print(
        f"data: {source}; {len(train_data.pairs)} training pairs (validation split from them), "
        f"{len(test_data.pairs)} test pairs; {args.threads} threads"
    )
    results: dict[str, TrainResult] = {}
    wall: dict[str, float] = {}
    for name in (args.preset, args.baseline):
        results[name], wall[name] = run_one(name, train_data, args.minutes, args.seed, args.threads)
        sha = results[name].save(args.out / f"{name}.safetensors")
        print(
            f"  stop: {results[name].stop_reason}, {results[name].epochs} epochs, best {results[name].best_epoch}, "
            f"sha256 {sha[:12]}"
        )

    # The only use of test/: once per model, after all training is done.
    reports: dict[str, SegmentationReport] = {}
    ms: dict[str, float] = {}
    preds: dict[str, list[np.ndarray]] = {}
    for name, result in results.items():
        predictor = Predictor(result.checkpoint(), device="cpu")
        reports[name], ms[name], preds[name] = evaluate(predictor, test_data)

    a, b = args.preset, args.baseline
    print(f"\n== test set ({len(test_data.pairs)} images, natural resolution, no TTA) ==")
    print(f"{'metric':<24}{a:>16}{b:>16}{'ratio':>9}")

    def row(label: str, va: float, vb: float, fmt: str = "{:.4f}") -> None:
        ratio = va / vb if vb else float("nan")
        print(f"{label:<24}{fmt.format(va):>16}{fmt.format(vb):>16}{ratio:>9.3f}")

    for i, cls in enumerate(CLASSES):
        row(f"{cls} Dice", reports[a].per_class[i].dice, reports[b].per_class[i].dice)
        row(f"{cls} IoU", reports[a].per_class[i].iou, reports[b].per_class[i].iou)
    row("foreground mDice", reports[a].mDice, reports[b].mDice)
    row("mIoU (foreground)", reports[a].mIoU, reports[b].mIoU)
    row("mDice (with bg)", reports[a].mDice_with_background, reports[b].mDice_with_background)
    row("mIoU (with bg)", reports[a].mIoU_with_background, reports[b].mIoU_with_background)
    row("pixel accuracy", reports[a].accuracy, reports[b].accuracy)
    row("ms/frame (natural)", ms[a], ms[b], "{:.1f}")
    row("epochs in budget", results[a].epochs, results[b].epochs, "{:.0f}")
    row("train wall s", wall[a], wall[b], "{:.0f}")

    print(f"\nlearning curve: {save_curves(args.out, results)}")
    for i in range(min(args.overlays, len(test_data.pairs))):
        frame, truth = test_data.pairs[i]
        panels = [overlay(frame, truth.astype(np.uint8))] + [overlay(frame, preds[n][i]) for n in results]
        write_png(args.out / f"overlay_{i:02d}_truth_{a}_{b}.png", np.concatenate(panels, axis=1))
    (args.out / "report.json").write_text(
        json.dumps(
            {
                n: {
                    **reports[n].to_dict(),
                    "ms_per_frame": ms[n],
                    "epochs": results[n].epochs,
                    "history": [
                        {"epoch": p.epoch, "elapsed_s": p.elapsed_s, "loss": p.loss, "val_dice": p.val_dice}
                        for p in results[n].history
                    ],
                }
                for n in results
            },
            indent=1,
        )
    )
    if source.startswith("usgra-seg"):
        (args.out / "ATTRIBUTION.txt").write_text(
            'The overlay images are derived from the usgra-seg dataset: "usgra-seg dataset, T. M. K., CC-BY 4.0" '
            f"(licence: {args.data / 'LICENSE'}).\n"
        )
    print(f"overlays (truth | {a} | {b}) and report.json in {args.out}")


if __name__ == "__main__":
    main()

"""Generality bench: does the engine learn the same data at any frame geometry?

From usgra-seg it builds four geometries, the same transform applied to ``images/``, ``masks/``
and ``test/``: native, downscaled to 256x256, resized to 580x420 (anisotropic, a common scanner
frame) and upscaled to 1024x1024. For each geometry it trains the default engine (``cpu_small``,
planned from the data) and the plain U-Net of the same code (``cpu_small_unet``), each for the
same wall-clock budget on the same threads, and evaluates each once on the transformed ``test/``
at its natural size. One more run splits the training data by pseudo-subject (blocks of 5
consecutive images as one subject) to exercise subject-aware validation.

Reported per run: foreground mDice, per-class Dice and IoU, training images/second, the share of
the budget spent validating, and the planner's decisions; ratios against the native geometry and
against the U-Net of the same geometry, from the same run. Each finished run is saved as
``<out>/<geometry>__<model>.json`` and skipped when found, so a long bench can be run in parts
(``--geometries``) and the table is always rebuilt from every saved run.

    .venv/bin/python bench/bench_generality.py --minutes 25 --threads 2 --out bench/out/generality
    .venv/bin/python bench/bench_generality.py --table-only --out bench/out/generality

Without the dataset it falls back to generated frames (numbers then only prove the pipeline runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.model.data import TrainData, load_pairs_from_dirs
from backend.model.metrics import evaluate_masks
from backend.model.predict import Predictor
from backend.model.resample import resize_image, resize_mask
from backend.model.synthetic import make_blob_pairs
from backend.model.train import Progress, TrainResult, train
from backend.model.train_config import training_preset

DATA = Path("/work/shared/data/usgra-seg")
CLASSES = ("Nerve", "Vessel")
GEOMETRIES: dict[str, tuple[int, int] | None] = {  # (height, width); None = as stored
    "native": None,
    "256x256": (256, 256),
    "580x420": (420, 580),
    "1024x1024": (1024, 1024),
}
MODELS = ("cpu_small", "cpu_small_unet")
SUBJECT_BLOCK = 5


def load(data_dir: Path) -> tuple[TrainData, TrainData, str]:
    if (data_dir / "images").is_dir() and (data_dir / "test" / "images").is_dir():
        return (
            load_pairs_from_dirs(data_dir / "images", data_dir / "masks", CLASSES),
            load_pairs_from_dirs(data_dir / "test" / "images", data_dir / "test" / "masks", CLASSES),
            f"usgra-seg ({data_dir})",
        )
    print(f"NOTE: {data_dir} not found, using generated frames; numbers only prove the pipeline runs")
    return (
        TrainData(make_blob_pairs(40, (256, 256), 2, seed=1), CLASSES),
        TrainData(make_blob_pairs(10, (256, 256), 2, seed=2), CLASSES),
        "synthetic",
    )


def transform(data: TrainData, size: tuple[int, int] | None) -> TrainData:
    if size is None:
        return data
    pairs = [
        (np.clip(np.rint(resize_image(im, size)), 0, 255).astype(np.uint8), resize_mask(m, size, len(CLASSES) + 1))
        for im, m in data.pairs
    ]
    return dataclasses.replace(data, pairs=pairs)


def run(
    name: str, model: str, train_data: TrainData, test: TrainData, minutes: float, threads: int, seed: int
) -> dict[str, Any]:
    config = training_preset(model).replace(max_minutes=minutes, seed=seed, num_threads=threads, device="cpu")
    print(
        f"\n== {name} / {model}: {minutes:g} min on {threads} threads, {len(train_data.pairs)} training frames",
        flush=True,
    )

    def report(p: Progress) -> None:
        val = "" if p.val_dice is None else f" val {p.val_dice:.3f} (ema {p.val_smoothed:.3f})"
        print(f"  epoch {p.epoch:3d} {p.elapsed_s:6.0f}s loss {p.loss:.3f}{val}{' *' if p.is_best else ''}", flush=True)

    t0 = time.perf_counter()
    result: TrainResult = train(config, train_data, on_progress=report)
    wall = time.perf_counter() - t0
    for line in (result.plan or {}).get("decisions", []):
        print(f"  plan: {line}")
    predictor = Predictor(result.checkpoint(), device="cpu")
    preds = [predictor.predict([im])[0].mask for im, _ in test.pairs]  # the only use of test/
    rep = evaluate_masks(preds, [m for _, m in test.pairs], predictor.spec.class_names)
    return {
        "geometry": name,
        "model": model,
        "minutes": minutes,
        "threads": threads,
        "seed": seed,
        "fg_mDice": rep.mDice,
        "fg_mIoU": rep.mIoU,
        "accuracy": rep.accuracy,
        "per_class": {c.name: {"dice": c.dice, "iou": c.iou} for c in rep.per_class},
        "images_per_second": result.images_per_second,
        "val_fraction": result.val_fraction,
        "val_seconds": result.val_seconds,
        "wall_seconds": wall,
        "epochs": result.epochs,
        "steps": result.steps,
        "best_val_dice": result.best_val_dice,
        "n_train": result.n_train,
        "n_val": result.n_val,
        "plan": result.plan,
        "history": [
            {"elapsed_s": p.elapsed_s, "loss": p.loss, "val_dice": p.val_dice, "val_smoothed": p.val_smoothed}
            for p in result.history
        ],
    }


def table(out: Path) -> str:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*__*.json"))}
    if not runs:
        return "no runs saved yet"
    native = {r["model"]: r["fg_mDice"] for r in runs.values() if r["geometry"] == "native"}
    unet = {r["geometry"]: r["fg_mDice"] for r in runs.values() if r["model"] == "cpu_small_unet"}
    lines = [
        "| geometry | model | fg mDice | vs native | vs U-Net | Nerve Dice / IoU | Vessel Dice / IoU | "
        "images/s | validation share | scale, patch, batch | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs.values():
        nat = native.get(r["model"])
        ref = unet.get(r["geometry"])
        pc = r["per_class"]
        plan = r.get("plan") or {}
        geom = plan.get("patch_size", ["?", "?"])
        vs_native = "-" if nat is None else f"{r['fg_mDice'] - nat:+.3f}"
        vs_unet = "-" if ref is None or r["model"] == "cpu_small_unet" else f"{r['fg_mDice'] - ref:+.3f}"
        lines.append(
            f"| {r['geometry']} | {r['model']} | {r['fg_mDice']:.3f} | {vs_native} | {vs_unet} | "
            f"{pc['Nerve']['dice']:.3f} / {pc['Nerve']['iou']:.3f} | {pc['Vessel']['dice']:.3f} / {pc['Vessel']['iou']:.3f} | "
            f"{r['images_per_second']:.1f} | {100 * r['val_fraction']:.1f}% | "
            f"{plan.get('input_scale', '?')}, {geom[1]}x{geom[0]}, {plan.get('batch_size', '?')} | {r['minutes']:g} |"
        )
    return "\n".join(lines)


def curves(out: Path, figures: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*__*.json"))]
    written = []
    for geometry in sorted({r["geometry"] for r in runs}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in (r for r in runs if r["geometry"] == geometry):
            pts = [(h["elapsed_s"] / 60, h["val_dice"]) for h in r["history"] if h["val_dice"] is not None]
            ema = [(h["elapsed_s"] / 60, h["val_smoothed"]) for h in r["history"] if h["val_smoothed"] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=False), "o", ms=3, alpha=0.5, label=f"{r['model']} val (sample)")
            if ema:
                ax.plot(*zip(*ema, strict=False), "-", label=f"{r['model']} EMA")
        ax.set(xlabel="minutes", ylabel="validation foreground Dice", ylim=(0, 1), title=f"usgra-seg at {geometry}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = figures / f"generality_{geometry}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--geometries", default=",".join([*GEOMETRIES, "native-subjects"]))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        torch.set_num_threads(args.threads)
        train_data, test_data, source = load(args.data)
        print(f"data: {source}; {len(train_data.pairs)} training, {len(test_data.pairs)} test frames")
        for name in args.geometries.split(","):
            subjects = name.endswith("-subjects")
            size = GEOMETRIES[name.removesuffix("-subjects")]
            train_g, test_g = transform(train_data, size), transform(test_data, size)
            if subjects:
                train_g = dataclasses.replace(
                    train_g, subjects=[f"block{i // SUBJECT_BLOCK}" for i in range(len(train_g.pairs))]
                )
            for model in args.models.split(","):
                if subjects and model != MODELS[0]:
                    continue
                path = args.out / f"{name}__{model}.json"
                if path.exists():
                    print(f"{path.name}: done before, skipped")
                    continue
                result = run(name, model, train_g, test_g, args.minutes, args.threads, args.seed)
                path.write_text(json.dumps(result, indent=1))
                print(
                    f"  test fg mDice {result['fg_mDice']:.4f}, {result['images_per_second']:.1f} images/s, "
                    f"validation {100 * result['val_fraction']:.1f}% of the run"
                )
    print("\n" + table(args.out))
    args.figures.mkdir(parents=True, exist_ok=True)
    for path in curves(args.out, args.figures):
        print(f"figure: {path}")


if __name__ == "__main__":
    main()

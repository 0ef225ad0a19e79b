"""Ablation on the VALIDATION split only: which form of the Mamba layer ``cpu_small`` should use.

Trains each variant on usgra-seg ``images/`` (the training pipeline's own validation split, 20%,
picks nothing but is reported) for the same wall-clock budget, and prints the best validation
foreground Dice per variant with its ratio to the plain U-Net trained in the same run. ``test/`` is
never read: this is the script that decisions about the preset are allowed to come from.

Variants (all ``cpu_small`` topology, AdamW preset, same seed):

``unet``       no Mamba layer (``cpu_small_unet``), the baseline
``bare``       U-Mamba's published layer, ``Mamba(LayerNorm(x))`` at the 8x8 bottleneck
``residual``   ``x + Mamba(LayerNorm(x))`` (the ``cpu_small`` default)

``--jobs 2 --threads 1`` runs two variants at a time, one core each, so three variants take two
budgets of wall-clock time on a 2-core machine; every variant then gets the same kind of core.

    .venv/bin/python bench/bench_mamba_variants.py --minutes 20 --jobs 2 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path("/work/shared/data/usgra-seg")
CLASSES = ("Nerve", "Vessel")
VARIANTS = ("unet", "bare", "residual")


def variant_spec(name: str):  # type: ignore[no-untyped-def]
    from backend.model.spec import MambaOptions, preset_spec

    if name == "unet":
        return preset_spec("cpu_small_unet", CLASSES)
    spec = preset_spec("cpu_small", CLASSES)
    return dataclasses.replace(spec, mamba=MambaOptions(residual=name == "residual"))


def run_variant(name: str, minutes: float, threads: int, seed: int, data_dir: Path) -> dict[str, object]:
    """Train one variant in this process; returns its validation history."""
    import torch

    from backend.model.data import TrainData, load_pairs_from_dirs
    from backend.model.synthetic import make_blob_pairs
    from backend.model.train import train
    from backend.model.train_config import training_preset

    torch.set_num_threads(threads)
    if (data_dir / "images").is_dir():
        data = load_pairs_from_dirs(data_dir / "images", data_dir / "masks", CLASSES)
    else:
        data = TrainData(make_blob_pairs(48, (256, 256), 2, seed=1), CLASSES)
    config = training_preset("cpu_small").replace(max_minutes=minutes, seed=seed, num_threads=threads, device="cpu")
    result = train(config, data, spec=variant_spec(name))
    history = [{"epoch": p.epoch, "elapsed_s": p.elapsed_s, "val_dice": p.val_dice} for p in result.history]
    best = max((p.val_dice for p in result.history if p.val_dice is not None), default=float("nan"))
    return {"variant": name, "best_val_dice": best, "epochs": result.epochs, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at the same time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: train one variant, print JSON
    args = parser.parse_args()

    if args.one:
        print(json.dumps(run_variant(args.one, args.minutes, args.threads, args.seed, args.data)))
        return

    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown or "unet" not in names:
        parser.error(f"variants must include unet and come from {VARIANTS}; got {names}")
    print(f"{len(names)} variants, {args.minutes:g} min each, {args.jobs} at a time x {args.threads} threads")
    results: dict[str, dict[str, object]] = {}
    pending = list(names)
    running: list[tuple[str, subprocess.Popen[str]]] = []
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            cmd = [sys.executable, __file__, "--one", name, "--minutes", str(args.minutes)]
            cmd += ["--threads", str(args.threads), "--seed", str(args.seed), "--data", str(args.data)]
            running.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((name, proc))
            out = proc.stdout.read() if proc.stdout else ""
            if proc.returncode:
                raise SystemExit(f"variant {name} failed with exit code {proc.returncode}")
            results[name] = json.loads(out.strip().splitlines()[-1])
            print(f"  {name}: best val Dice {results[name]['best_val_dice']:.4f} ({results[name]['epochs']} epochs)")

    base = float(results["unet"]["best_val_dice"])  # type: ignore[arg-type]
    print(f"\n{'variant':<10}{'best val fg Dice':>18}{'epochs':>8}{'vs unet':>9}   ({time.perf_counter() - t0:.0f} s)")
    for name in names:
        r = results[name]
        dice = float(r["best_val_dice"])  # type: ignore[arg-type]
        print(f"{name:<10}{dice:>18.4f}{r['epochs']:>8}{dice / base:>9.3f}")


if __name__ == "__main__":
    main()

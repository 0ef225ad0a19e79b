"""``sonoseg model``: train, evaluate and run segmentation models from image folders.

Heavy modules (torch, SimpleITK) are imported inside the commands so ``sonoseg --help`` stays fast.
Every :class:`~backend.errors.SonosegError` becomes a :class:`click.ClickException` with its message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from backend.errors import SonosegError

log = logging.getLogger(__name__)

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except SonosegError as exc:
        raise click.ClickException(exc.message) from exc


@click.group("model")
def model() -> None:
    """Train, evaluate and run U-Mamba segmentation models."""


@model.command("train")
@click.option("--images", "images_dir", type=_DIR, required=True, help="Folder of frames.")
@click.option("--masks", "masks_dir", type=_DIR, required=True, help="Folder of masks, same file names.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Checkpoint file to write (.safetensors).",
)
@click.option("--labels", default=None, help="Foreground class names in mask-value order, e.g. Nerve,Vessel.")
@click.option("--preset", default="cpu_small", show_default=True, help="Model preset.")
@click.option("--minutes", type=float, default=None, help="Wall-clock budget (default: the preset's).")
@click.option("--epochs", type=int, default=None, help="Maximum epochs (default: the preset's).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Default: the preset's.")
@click.option("--init", "init_path", type=_FILE, default=None, help="Fine-tune from this checkpoint.")
@click.option("--val-fraction", type=float, default=None, help="Share of images held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--iterations", type=int, default=None, help="Iterations per epoch (default: the preset's).")
@click.option("--batch-size", type=int, default=None, help="Default: the preset's.")
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Resume-state file: written every epoch, and resumed from when it exists.",
)
def train_cmd(
    images_dir: Path,
    masks_dir: Path,
    out_path: Path,
    labels: str | None,
    preset: str,
    minutes: float | None,
    epochs: int | None,
    device: str | None,
    init_path: Path | None,
    val_fraction: float | None,
    seed: int,
    iterations: int | None,
    batch_size: int | None,
    state_path: Path | None,
) -> None:
    """Train a model on IMAGES/MASKS and write the best checkpoint to OUT."""
    with _user_errors():
        from backend.model.data import load_pairs_from_dirs
        from backend.model.train import Progress, train
        from backend.model.train_config import training_preset

        classes = [c.strip() for c in labels.split(",") if c.strip()] if labels else None
        data = load_pairs_from_dirs(images_dir, masks_dir, classes)
        config = training_preset(preset)
        overrides: dict[str, Any] = {"seed": seed}
        for key, value in (
            ("max_minutes", minutes),
            ("epochs", epochs),
            ("device", device),
            ("val_fraction", val_fraction),
            ("iterations_per_epoch", iterations),
            ("batch_size", batch_size),
        ):
            if value is not None:
                overrides[key] = value
        config = config.replace(**overrides)
        click.echo(
            f"training {preset} on {len(data.pairs)} images, classes {', '.join(data.classes)}"
            + (f", budget {config.max_minutes:g} min" if config.max_minutes else "")
        )
        resume = state_path if state_path is not None and state_path.exists() else None
        with click.progressbar(length=1000, label="training", show_eta=True) as bar:
            done = 0

            def report(p: Progress) -> None:
                nonlocal done
                target = min(1000, round(p.fraction * 1000))
                bar.label = f"epoch {p.epoch} loss {p.loss:.3f} train Dice {p.train_dice:.3f}" + (
                    "" if p.val_dice is None else f" val Dice {p.val_dice:.3f}"
                )
                bar.update(max(0, target - done))
                done = max(done, target)

            result = train(
                config, data, on_progress=report, init_checkpoint=init_path, resume_from=resume, state_path=state_path
            )
            bar.update(1000 - done)
        sha = result.save(out_path)
        val = "n/a" if result.best_val_dice is None else f"{result.best_val_dice:.4f}"
        click.echo(
            f"stopped: {result.stop_reason} after {result.epochs} epochs ({result.elapsed_s:.0f} s); "
            f"best epoch {result.best_epoch}, validation foreground Dice {val}"
        )
        click.echo(f"wrote {out_path} sha256={sha}")


@model.command("evaluate")
@click.option("--checkpoint", "checkpoint_path", type=_FILE, required=True)
@click.option("--images", "images_dir", type=_DIR, required=True)
@click.option("--masks", "masks_dir", type=_DIR, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--tta/--no-tta", default=False, show_default=True, help="Left-right flip test-time augmentation.")
def evaluate_cmd(
    checkpoint_path: Path, images_dir: Path, masks_dir: Path, as_json: bool, device: str, tta: bool
) -> None:
    """Score a checkpoint on IMAGES/MASKS (see backend.model.metrics for definitions)."""
    with _user_errors():
        from backend.model.data import load_pairs_from_dirs
        from backend.model.metrics import evaluate_masks
        from backend.model.predict import PredictOptions, Predictor

        predictor = Predictor.from_file(checkpoint_path, device=device, options=PredictOptions(tta_flip=tta))
        data = load_pairs_from_dirs(images_dir, masks_dir, predictor.spec.classes)
        images = [im for im, _ in data.pairs]
        preds = [r.mask for r in predictor.predict(images)]
        report = evaluate_masks(preds, [m for _, m in data.pairs], predictor.spec.class_names)
        if as_json:
            click.echo(json.dumps(report.to_dict(), sort_keys=True))
            return
        click.echo(f"{report.n_images} images, checkpoint sha256 {predictor.sha256[:12]}")
        click.echo(f"{'class':<16}{'Dice':>8}{'IoU':>8}{'img Dice mean':>15}{'median':>8}{'p10':>8}")
        for c in (*report.per_class, report.background):
            click.echo(
                f"{c.name:<16}{c.dice:>8.4f}{c.iou:>8.4f}{c.image_dice_mean:>15.4f}"
                f"{c.image_dice_median:>8.4f}{c.image_dice_p10:>8.4f}"
            )
        click.echo(f"foreground mDice {report.mDice:.4f}  mIoU {report.mIoU:.4f}  accuracy {report.accuracy:.4f}")
        click.echo(f"with background: mDice {report.mDice_with_background:.4f}  mIoU {report.mIoU_with_background:.4f}")


@model.command("predict")
@click.option("--checkpoint", "checkpoint_path", type=_FILE, required=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--tta/--no-tta", default=False, show_default=True)
@click.option("--largest-component/--all-components", default=False, show_default=True)
@click.argument("images", nargs=-1, required=True, type=_FILE)
def predict_cmd(
    checkpoint_path: Path, out_dir: Path, device: str, tta: bool, largest_component: bool, images: tuple[Path, ...]
) -> None:
    """Segment IMAGE files; writes <name>_mask.png (class indices) and <name>_overlay.png."""
    with _user_errors():
        from backend.model.image_files import read_image, stem_of, write_png
        from backend.model.overlay import overlay
        from backend.model.predict import PredictOptions, Predictor

        predictor = Predictor.from_file(
            checkpoint_path,
            device=device,
            options=PredictOptions(tta_flip=tta, keep_largest_component=largest_component),
        )
        frames = [read_image(p) for p in images]
        for path, frame, result in zip(images, frames, predictor.predict(frames), strict=True):
            stem = stem_of(path)
            write_png(out_dir / f"{stem}_mask.png", result.mask)
            write_png(out_dir / f"{stem}_overlay.png", overlay(frame, result.mask))
            click.echo(f"{path.name}: score {result.score:.3f} uncertainty {result.uncertainty:.3f}")
        click.echo(f"wrote {2 * len(images)} files to {out_dir}")

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
    "--subject-regex",
    default=None,
    help="Subject of each file from its name: the first group of this regex (e.g. '^(\\d+)_' for 12_34.png).",
)
@click.option("--subjects-csv", type=_FILE, default=None, help="CSV with columns file,subject.")
@click.option("--no-plan", is_flag=True, help="Train the preset's geometry verbatim instead of planning from the data.")
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
    subject_regex: str | None,
    subjects_csv: Path | None,
    no_plan: bool,
    state_path: Path | None,
) -> None:
    """Train a model on IMAGES/MASKS and write the best checkpoint to OUT."""
    with _user_errors():
        import dataclasses

        from backend.model.train import Progress, train
        from backend.model.train_config import training_preset

        data = _load(images_dir, masks_dir, labels, subject_regex, subjects_csv)
        if data.subjects is not None:
            click.echo(f"{len(set(data.subjects))} subjects: validation never shares one with training")
        data = dataclasses.replace(data)
        config = training_preset(preset)
        overrides: dict[str, Any] = {"seed": seed, "plan": not no_plan}
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
        for line in (result.plan or {}).get("decisions", []):
            click.echo(f"plan: {line}")
        click.echo(
            f"stopped: {result.stop_reason} after {result.epochs} epochs ({result.elapsed_s:.0f} s); "
            f"best epoch {result.best_epoch}, validation foreground Dice {val} (all {result.n_val} held-out frames)"
        )
        click.echo(
            f"throughput {result.images_per_second:.2f} images/s; validation took {result.val_seconds:.0f} s "
            f"({100 * result.val_fraction:.1f}% of the run)"
        )
        click.echo(f"wrote {out_path} sha256={sha}")


def _load(
    images_dir: Path, masks_dir: Path, labels: str | None, subject_regex: str | None, subjects_csv: Path | None
) -> Any:
    import dataclasses

    from backend.model.data import load_pairs_from_dirs, subjects_from_csv, subjects_from_names

    if subject_regex and subjects_csv:
        raise click.UsageError("give --subject-regex or --subjects-csv, not both")
    classes = [c.strip() for c in labels.split(",") if c.strip()] if labels else None
    data = load_pairs_from_dirs(images_dir, masks_dir, classes)
    names = list(data.names or [])
    if subject_regex:
        return dataclasses.replace(data, subjects=subjects_from_names(names, subject_regex))
    if subjects_csv:
        return dataclasses.replace(data, subjects=subjects_from_csv(names, subjects_csv))
    return data


@model.command("plan")
@click.option("--images", "images_dir", type=_DIR, required=True, help="Folder of frames.")
@click.option("--masks", "masks_dir", type=_DIR, required=True, help="Folder of masks, same file names.")
@click.option("--labels", default=None, help="Foreground class names in mask-value order.")
@click.option("--preset", default="cpu_small", show_default=True, help="Model preset to plan from.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan and the fingerprint as one JSON object.")
def plan_cmd(images_dir: Path, masks_dir: Path, labels: str | None, preset: str, as_json: bool) -> None:
    """Print the network plan the planner derives for IMAGES/MASKS, one line per decision."""
    with _user_errors():
        from backend.model.fingerprint import fingerprint
        from backend.model.planner import plan_network
        from backend.model.train_config import training_preset

        data = _load(images_dir, masks_dir, labels, None, None)
        fp = fingerprint(list(data.pairs), data.classes)
        plan = plan_network(fp, preset, tuple(data.classes), training_preset(preset).batch_size)
        if as_json:
            click.echo(json.dumps({"plan": plan.to_dict(), "fingerprint": fp.to_dict()}, sort_keys=True))
            return
        for line in plan.decisions:
            click.echo(line)
        click.echo(
            f"=> scale {plan.spec.input_scale:g}, patch {plan.spec.patch_size[1]}x{plan.spec.patch_size[0]}, "
            f"{plan.spec.n_stages} stages, batch {plan.batch_size}"
        )


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
        from backend.model.overlay import labelled_overlay
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
            title = f"score {result.score:.3f}  uncertainty {result.uncertainty:.3f}"
            write_png(
                out_dir / f"{stem}_overlay.png", labelled_overlay(frame, result.mask, predictor.spec.classes, title)
            )
            click.echo(f"{path.name}: score {result.score:.3f} uncertainty {result.uncertainty:.3f}")
        click.echo(f"wrote {2 * len(images)} files to {out_dir}")

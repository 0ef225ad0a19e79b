"""Training throughput: the bench's bare step vs ``sonoseg model train`` vs a Celery worker's run.

Issue 11 asks that a real run trains as fast as the bench says it can: data decoded and
preprocessed once, augmentation cheap, no per-step overhead outside what the bench measures. One
run measures, on the same frames, preset, threads and budget:

- ``model train``: the product command ``sonoseg model train`` in a subprocess; its checkpoint
  records the run's images/s over the seconds spent in training steps, its validation seconds and
  the steps made. Wall-clock seconds are counted from the command's start to its exit.
- ``worker``: a real ``sonoseg worker --pool solo --beat`` (SQLite and the embedded broker in a
  scratch data directory) trains a run queued with ``sonoseg train`` on the same frames imported
  into a project (``sonoseg import``); the run records the same figures in its progress.
- ``bare steps`` (the baseline): forward + backward + optimiser step of the network the run
  planned (its spec, patch and batch), on one fixed random batch, no data pipeline at all, for the
  same budget. This is what ``bench/bench_inference.py`` measures.

Ratios are against the bare steps of the same run. ``images/s`` counts training frames through the
network per second of training steps; ``images/s wall`` the same frames per second of the whole
command (setup, decoding, validation, saving included).

    .venv/bin/python bench/bench_train_throughput.py --minutes 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path("/work/shared/data/usgra-seg")
CLASSES = "Nerve,Vessel"
SONOSEG = [sys.executable, "-m", "cli.main"]


@dataclass(frozen=True)
class Measured:
    path: str
    images_per_second: float  # over training-step seconds
    steps: int
    batch_size: int
    wall_seconds: float
    val_seconds: float

    @property
    def wall_images_per_second(self) -> float:
        return self.steps * self.batch_size / self.wall_seconds if self.wall_seconds > 0 else 0.0


def frames(data: Path, scratch: Path) -> tuple[Path, Path]:
    """usgra-seg ``images/`` (never ``test/``), or generated frames when it is absent."""
    if (data / "images").is_dir():
        return data / "images", data / "masks"
    from PIL import Image as PILImage

    from backend.model.synthetic import make_blob_pairs

    images, masks = scratch / "gen" / "images", scratch / "gen" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i, (image, mask) in enumerate(make_blob_pairs(60, size=(256, 256), seed=0)):
        PILImage.fromarray(image).save(images / f"{i:04d}.png")
        PILImage.fromarray(mask).save(masks / f"{i:04d}.png")
    return images, masks


def model_train(images: Path, masks: Path, minutes: float, scratch: Path, env: dict[str, str]) -> Measured:
    from backend.model.checkpoint import load_checkpoint

    out = scratch / "cli.safetensors"
    cmd = [*SONOSEG, "model", "train", "--images", str(images), "--masks", str(masks), "--labels", CLASSES]
    cmd += ["--minutes", str(minutes), "--device", "cpu", "--out", str(out)]
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    summary = load_checkpoint(out).summary
    return Measured(
        "sonoseg model train",
        float(summary["images_per_second"]),
        int(summary["steps"]),
        int(summary["config"]["batch_size"]),
        wall,
        float(summary["val_seconds"]),
    )


def worker_run(images: Path, masks: Path, minutes: float, scratch: Path, env: dict[str, str]) -> Measured:
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from backend.db.models import ModelVersion, TrainingRun

    data_dir = scratch / "data"
    env = {
        **env,
        "SONOSEG_DATA_DIR": str(data_dir),
        "SONOSEG_DATABASE_URL": f"sqlite:///{data_dir / 'sonoseg.db'}",
        "SONOSEG_TRAIN_MAX_MINUTES": str(minutes),
        "SONOSEG_MODEL_PRESET": "cpu_small",
        "SONOSEG_DEVICE": "cpu",
        "SONOSEG_RETRAIN_AFTER": "1000000",  # only the run this bench queues
    }
    data_dir.mkdir(parents=True)

    def sonoseg(*args: str) -> None:
        subprocess.run([*SONOSEG, *args], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)

    sonoseg("db", "upgrade")
    sonoseg("import", "--project", "bench", "--labels", CLASSES, "--masks", str(masks), str(images))
    log = (scratch / "worker.log").open("wb")
    worker = subprocess.Popen(
        [*SONOSEG, "worker", "--pool", "solo", "--beat"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        t0 = time.monotonic()
        sonoseg("train", "--project", "bench")
        engine = create_engine(env["SONOSEG_DATABASE_URL"])
        deadline = t0 + minutes * 60 + 900
        finished: tuple[str, str | None, float, dict[str, object], dict[str, object]] | None = None
        while finished is None:
            with Session(engine) as session:
                run = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())).first()
                if run is not None and run.status in ("succeeded", "failed", "cancelled"):
                    version = session.get(ModelVersion, run.model_version_id) if run.model_version_id else None
                    started, ended = run.started_at, run.finished_at
                    wall = (ended - started).total_seconds() if started and ended else float("nan")
                    metrics = dict(version.metrics) if version is not None else {}
                    finished = (run.status, run.error, wall, dict(run.progress), metrics)
            if finished is None:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit(f"the worker's run did not finish; see {scratch / 'worker.log'}")
                time.sleep(2)
        engine.dispose()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        log.close()
    status, error, wall, progress, metrics = finished
    if status != "succeeded":
        raise SystemExit(f"the worker's run {status}: {error}")
    return Measured(
        "worker (sonoseg worker --pool solo)",
        float(str(progress["images_per_second"])),
        int(str(metrics["steps"])),
        int(str(metrics["batch_size"])),
        wall,
        float(str(metrics["val_seconds"])),
    )


def bare_steps(checkpoint: Path, minutes: float, threads: int) -> Measured:
    """The bench's loop on the network the CLI run planned, for the same budget."""
    import torch

    from backend.model.checkpoint import load_checkpoint
    from backend.model.device import autocast, keep_freed_memory_mapped
    from backend.model.losses import DeepSupervisionLoss, DiceCELoss
    from backend.model.networks import build_model

    keep_freed_memory_mapped()
    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    spec, batch = ckpt.spec, int(ckpt.summary["config"]["batch_size"])
    torch.manual_seed(0)
    model = build_model(spec).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = DeepSupervisionLoss(DiceCELoss(), spec.n_stages - 1)
    x = torch.randn(batch, spec.in_channels, *spec.patch_size)
    y = torch.randint(0, spec.num_classes, (batch, *spec.patch_size))
    steps, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < minutes * 60:
        with autocast(torch.device("cpu"), True):
            loss = loss_fn(model.forward_deep_supervision(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    seconds = time.monotonic() - t0
    return Measured("bare steps (baseline)", steps * batch / seconds, steps, batch, seconds, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="sonoseg-throughput-") as tmp:
        scratch = Path(tmp)
        images, masks = frames(args.data, scratch)
        cli = model_train(images, masks, args.minutes, scratch, env)
        worker = worker_run(images, masks, args.minutes, scratch, env)
        bare = bare_steps(scratch / "cli.safetensors", args.minutes, args.threads)
    rows = [bare, cli, worker]
    print(f"frames: {images}; {args.minutes:g} min each, {args.threads} threads")
    print(
        f"{'path':40s} {'images/s':>9s} {'x bare':>7s} {'steps':>6s} {'wall s':>7s} {'img/s wall':>10s} {'val s':>6s}"
    )
    for row in rows:
        print(
            f"{row.path:40s} {row.images_per_second:9.2f} {row.images_per_second / bare.images_per_second:7.2f} "
            f"{row.steps:6d} {row.wall_seconds:7.0f} {row.wall_images_per_second:10.2f} {row.val_seconds:6.0f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                [{**row.__dict__, "wall_images_per_second": row.wall_images_per_second} for row in rows], indent=2
            )
        )


if __name__ == "__main__":
    main()

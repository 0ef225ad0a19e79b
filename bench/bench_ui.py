"""Dashboard pages (/ui) on a large project: server time per page and SQL statements per page.

Builds a SQLite database with one project of ``--images`` images (default 10,000; 70 % labelled,
10 % with an older label version too, two annotators) and ``--versions`` model versions (default
50, with realistic ``metrics`` JSON: per-class report and the list of validation mask version ids),
two predictions per image spread over the versions, 60 training runs and the serving audit log.
Rows are bulk-inserted with SQLAlchemy Core, not through the import pipeline; the image and mask
rows share eight real PNG frames and masks in the blob store (enough for the statistics and review
computations to read real masks).

Each page is requested ``--repeats`` times with the Flask test client (in process: server time,
no network) after one warm-up; the median is printed with its ratio to two baselines measured in
the same run: ``/health`` (no database) and ``/versions`` (one short unit of work with one query).
The statements each page issues are counted with SQLAlchemy's ``before_cursor_execute`` event.
The dataset and review pages show results computed in the background: the first request starts
that computation (its duration is printed), the timed requests read the cache.

    .venv/bin/python bench/bench_ui.py                          # 10,000 images, 50 versions, 15 repeats
    .venv/bin/python bench/bench_ui.py --images 2000 --versions 10 --repeats 5
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import event, insert, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.api.app import AppState, create_app
from backend.api.ui.views import ui_state
from backend.db.migrate import upgrade
from backend.db.models import Image, MaskVersion, ModelVersion, Prediction, Project, ServingChange, TrainingRun
from backend.db.session import make_engine, make_session_factory, unit_of_work
from backend.imaging.io import encode_png
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.model.synthetic import make_blob_pairs
from backend.services.masks import mask_sha256
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore

USER, PASSWORD = "bench", "bench-password"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
CLASSES = ["Nerve", "Vessel"]
BASE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def build(settings: Settings, n_images: int, n_versions: int, seed: int = 0) -> int:
    """The large project (see the module docstring); returns its id."""
    rng = random.Random(seed)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    store = LocalBlobStore(settings.store_dir)
    pairs = make_blob_pairs(8, size=(128, 128), seed=seed)
    frames = [store.put_bytes("images", encode_png(f), ".png").key for f, _ in pairs]
    masks = [(store.put_bytes("masks", encode_png(m.astype(np.uint8)), ".png").key, mask_sha256(m)) for _, m in pairs]
    fg = [int((m > 0).sum()) for _, m in pairs]
    splits = ["train"] * 7 + ["val"] * 2 + ["test"]
    with unit_of_work(factory) as s:
        project = Project(name="large", ls_project_id=1, class_names=CLASSES, label_config=DEFAULT_LABEL_CONFIG)
        s.add(project)
        s.flush()
        pid = project.id
        s.execute(
            insert(Image),
            [
                {
                    "project_id": pid,
                    "sha256": f"{i:064x}",
                    "blob_key": frames[i % 8],
                    "width": 128,
                    "height": 128,
                    "subject": f"subj-{i // 10:016x}",
                    "split": splits[(i // 10) % 10],
                    "source_format": "png",
                    "created_at": BASE + dt.timedelta(seconds=i),
                }
                for i in range(n_images)
            ],
        )
        image_ids = list(s.scalars(select(Image.id).where(Image.project_id == pid).order_by(Image.id)))
        rows = []
        for n, image_id in enumerate(image_ids):
            if n % 10 >= 7:
                continue  # 30 % unlabelled
            history = n % 10 == 0
            for version in (1, 2) if history else (1,):
                current = version == (2 if history else 1)
                key, sha = masks[(n + version) % 8]
                rows.append(
                    {
                        "image_id": image_id,
                        "version": version,
                        "source": "annotation",
                        "author": ("alice", "bob")[n % 2],
                        "blob_key": key,
                        "sha256": sha,
                        "foreground_pixels": fg[(n + version) % 8],
                        "is_current": current,
                        "active": True,
                    }
                )
        s.execute(insert(MaskVersion), rows)
        val_masks = list(
            s.scalars(
                select(MaskVersion.id)
                .join(Image, Image.id == MaskVersion.image_id)
                .where(Image.project_id == pid, Image.split == "val", MaskVersion.is_current)
            )
        )
        versions = []
        for i in range(n_versions):
            d = 0.3 + 0.5 * (1 - np.exp(-i / 10)) + rng.uniform(-0.03, 0.03)
            versions.append(
                ModelVersion(
                    project_id=pid,
                    uid=f"p{pid}-bench-{i:03d}",
                    status="retired" if i < n_versions - 3 else "candidate",
                    arch="umamba_bot_2d",
                    checkpoint_key=f"checkpoints/bench-{i}.safetensors",
                    checkpoint_sha256="0" * 64,
                    gate_reason=f"gate: fg_mDice {d:.4f} >= serving + margin 0",
                    created_at=BASE + dt.timedelta(days=i),
                    metrics={
                        "n_train": 100 + i * 100,
                        "n_val": len(val_masks),
                        "val_mask_versions": val_masks,
                        "fg_mDice": d,
                        "fg_mIoU": d - 0.1,
                        "fg_image_dice": d - 0.02,
                        "epochs": 30,
                        "best_epoch": 27,
                        "stop_reason": "budget",
                        "train_seconds": 1800.0,
                        "val_report": {
                            "mDice": d,
                            "mIoU": d - 0.1,
                            "n_images": len(val_masks),
                            "per_class": {c: {"dice": d + k * 0.04, "iou": d - 0.1} for k, c in enumerate(CLASSES)},
                        },
                        "plan": {"scale": "small", "patch": [256, 256], "batch": 8},
                    },
                )
            )
        versions[-3].status = "serving"
        s.add_all(versions)
        s.flush()
        for i, v in enumerate(versions[: n_versions - 2]):
            s.add(
                ServingChange(
                    project_id=pid,
                    model_version_id=v.id,
                    previous_id=versions[i - 1].id if i else None,
                    kind="promote",
                    reason="gate",
                )
            )
        served = [v for v in versions[: n_versions - 2]]
        preds = []
        for n, image_id in enumerate(image_ids):
            for k in range(2):
                v = served[(n * 2 + k) % len(served)] if (n + k) % 7 else None
                dice = min(1.0, max(0.0, rng.gauss(0.85, 0.15))) if n % 10 < 7 else None
                preds.append(
                    {
                        "image_id": image_id,
                        "model_version_id": v.id if v is not None else None,
                        "model_version_uid": v.uid if v is not None else "untrained",
                        "score": 0.9,
                        "uncertainty": 0.1,
                        "correction_dice": dice,
                    }
                )
        s.execute(insert(Prediction), preds)
        for r in range(60):
            s.add(
                TrainingRun(
                    project_id=pid,
                    trigger="annotations",
                    status="running" if r == 59 else ("failed" if r % 9 == 0 else "succeeded"),
                    progress={"phase": "training", "epoch": 7, "loss": 0.31, "val_dice": 0.74, "fraction": 0.4},
                    worker="celery@gpu1",
                    device="cuda:0 (NVIDIA H200)",
                    error="RuntimeError: CUDA out of memory" if r % 9 == 0 else None,
                    created_at=BASE + dt.timedelta(hours=r * 12),
                )
            )
    engine.dispose()
    return pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'sonoseg.db'}",
        basic_auth_user=USER,
        basic_auth_password=PASSWORD,
        label_studio_url="http://labelstudio.local:8080",
        model_poll_seconds=3600,
    )
    t0 = time.perf_counter()
    pid = build(settings, args.images, args.versions)
    print(f"built {args.images} images, {args.versions} versions in {time.perf_counter() - t0:.1f} s ({tmp})")

    app = create_app(settings, start_background=False)
    state: AppState = app.extensions["sonoseg"]
    client = app.test_client()
    engine = state.runtime.engine
    statements: list[int] = [0]

    def on_execute(*_: Any) -> None:
        statements[0] += 1

    event.listen(engine, "before_cursor_execute", on_execute)

    def call(path: str) -> tuple[float, int]:
        statements[0] = 0
        start = time.perf_counter()
        resp = client.get(path, headers=AUTH)
        elapsed = time.perf_counter() - start
        if resp.status_code != 200:
            raise SystemExit(f"{path}: {resp.status_code} {resp.get_data(as_text=True)[:300]}")
        return elapsed, statements[0]

    for kind, path in (("stats", f"/ui/projects/{pid}/dataset"), ("review", f"/ui/projects/{pid}/review")):
        start = time.perf_counter()
        call(path)  # starts the background computation
        ui_state(app).refresher.wait(1800)
        print(f"background {kind} computation (once per change of the data): {time.perf_counter() - start:.1f} s")

    pages = {
        "baseline /health": "/health",
        "baseline /versions": f"/versions?project={1}",
        "overview": "/ui/",
        "models": f"/ui/projects/{pid}/models",
        "effort": f"/ui/projects/{pid}/effort",
        "runs": f"/ui/projects/{pid}/runs",
        "runs.json": f"/ui/projects/{pid}/runs.json",
        "dataset": f"/ui/projects/{pid}/dataset",
        "review": f"/ui/projects/{pid}/review",
        "next": f"/ui/projects/{pid}/next",
    }
    results: dict[str, tuple[float, int]] = {}
    for _ in range(2):  # warm-up
        for path in pages.values():
            call(path)
    samples: dict[str, list[float]] = {name: [] for name in pages}
    counts: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, so machine load hits every page alike
        for name, path in pages.items():
            elapsed, n = call(path)
            samples[name].append(elapsed)
            counts[name] = n
    for name in pages:
        results[name] = (statistics.median(samples[name]) * 1e3, counts[name])
    health, versions = results["baseline /health"][0], results["baseline /versions"][0]
    print(f"\nmedian of {args.repeats} (Flask test client, in process), {args.images} images, {args.versions} versions")
    print(f"{'page':22s} {'median ms':>10s} {'max ms':>8s} {'x /health':>10s} {'x /versions':>12s} {'statements':>11s}")
    for name, (ms, n) in results.items():
        worst = max(samples[name]) * 1e3
        print(f"{name:22s} {ms:10.1f} {worst:8.1f} {ms / health:10.1f} {ms / versions:12.1f} {n:11d}")
    slow = [name for name, (ms, _) in results.items() if ms > 300]
    print("\nall pages under 300 ms" if not slow else f"\nover 300 ms: {', '.join(slow)}")
    state.close()


if __name__ == "__main__":
    main()

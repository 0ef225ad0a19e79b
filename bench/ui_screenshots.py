"""Screenshots of every dashboard page (docs/figures/ui_<page>.png) on a small demo project.

The demo is made through the services (images, annotations by two annotators, a few images
labelled by both, model versions registered and promoted as the gate would, stored predictions
with their correction Dice, training runs), served by ``create_app`` on werkzeug and captured with
headless Chromium (playwright, the system's ``chromium``; nothing is downloaded). Numbers are made
up but consistent; the frames are the model engine's synthetic blobs.

    .venv/bin/python bench/ui_screenshots.py                 # writes docs/figures/ui_*.png
    .venv/bin/python bench/ui_screenshots.py --out /tmp/shots
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from scipy import ndimage
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.api.app import AppState, create_app
from backend.api.ui.views import ui_state
from backend.db.migrate import upgrade
from backend.db.models import Prediction, Project, TrainingRun
from backend.db.session import make_engine, make_session_factory, unit_of_work
from backend.model.synthetic import make_blob_pairs
from backend.services.annotations import correction_dice
from backend.services.images import SourceInfo, add_image
from backend.services.masks import add_mask_version
from backend.services.versions import promote, register_version
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore

USER, PASSWORD = "curator", "demo-password"
PAGES = ("models", "effort", "runs", "dataset", "review", "next")
BASE = (dt.datetime.now(dt.UTC) - dt.timedelta(days=16)).replace(hour=8, minute=0, second=0, microsecond=0)


def perturb(mask: np.ndarray, rng: random.Random, strength: int) -> np.ndarray:
    """A plausible model error: classes shifted and grown or shrunk by up to ``strength`` pixels."""
    out = np.zeros_like(mask)
    for cls in (1, 2):
        region = mask == cls
        if strength:
            region = np.roll(region, (rng.randint(-strength, strength), rng.randint(-strength, strength)), (0, 1))
            grow = rng.randint(-strength, strength)
            if grow > 0:
                region = ndimage.binary_dilation(region, iterations=grow)
            elif grow < 0:
                region = ndimage.binary_erosion(region, iterations=-grow)
        out[region] = cls
    return out


def build(settings: Settings) -> int:
    rng = random.Random(7)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    store = LocalBlobStore(settings.store_dir)
    pairs = make_blob_pairs(72, size=(192, 192), seed=5)
    with unit_of_work(factory) as s:
        project = Project(name="median-nerve", ls_project_id=3, class_names=["Nerve", "Vessel"])
        other = Project(name="ulnar-pilot", ls_project_id=None, class_names=["Nerve"], auto_retrain=False)
        s.add_all([project, other])
        s.flush()
        pid = project.id
        images, labels = [], []
        for i, (frame, mask) in enumerate(pairs):
            split = ("train", "train", "train", "val", "test")[(i // 3) % 5]
            image = add_image(
                s, store, project, frame, subject=f"s{i // 3}", source=SourceInfo("import"), split=split
            ).image
            images.append(image)
            mask = mask.astype(np.uint8)
            labels.append(mask)
            if i < 56:
                add_mask_version(s, store, project, image, mask, source="annotation", author=("alice", "bob")[i % 2])
            if i in (4, 9, 17):  # a second annotator who drew it differently
                add_mask_version(s, store, project, image, perturb(mask, rng, 4), source="annotation", author="carol")
            if i == 30:  # a stray brush dab: a size outlier
                dab = mask.copy()
                dab[5:8, 5:8] = 1
                add_mask_version(s, store, project, image, dab, source="annotation", author="alice")
        for i, (frame, _) in enumerate(make_blob_pairs(12, size=(192, 192), seed=9)):
            add_image(s, store, other, frame, subject=f"u{i}", source=SourceInfo("import"), split="train")

        versions = []
        for i in range(8):
            d = 0.35 + 0.45 * (1 - np.exp(-i / 2.5)) + rng.uniform(-0.02, 0.02)
            n_train = 8 + 5 * i
            metrics = {
                "n_train": n_train,
                "n_val": 10,
                "epochs": 20 + 3 * i,
                "stop_reason": "budget",
                "train_seconds": 600.0,
                "fg_mDice": d,
                "fg_mIoU": d - 0.12,
                "fg_image_dice": d - 0.03,
                "val_report": {
                    "mDice": d,
                    "per_class": {
                        "Nerve": {"dice": d - 0.06, "iou": d - 0.2},
                        "Vessel": {"dice": d + 0.05, "iou": d - 0.05},
                    },
                },
            }
            if i == 0:
                metrics = {"n_train": 4, "n_val": 0, "epochs": 3, "stop_reason": "budget"}
            v = register_version(
                s,
                project,
                arch="umamba_bot_2d",
                checkpoint_key=f"checkpoints/demo-{i}.safetensors",
                checkpoint_sha256="0" * 64,
                metrics=metrics,
            )
            v.created_at = BASE + dt.timedelta(days=2 * i, hours=rng.randint(0, 8))
            if i == 0:
                v.gate_reason = (
                    "first model not promoted: no labelled validation image to check it against; kept as a candidate"
                )
            elif i == 5:
                v.gate_reason = f"candidate fg_mDice {d:.4f} < serving {d + 0.01:.4f} + margin 0: kept as a candidate"
            else:
                promote(s, v, reason=f"gate: fg_mDice {d:.4f} >= serving + margin 0")
            versions.append(v)
        s.flush()
        serving = versions[-1]
        # predictions: the untrained empty suggestions, then each served model's, better over time
        for k, v in enumerate([None, *[v for v in versions if v.status in ("serving", "retired")]]):
            most = max(0, 7 - k)
            for i in range(k * 8, min(len(images), k * 8 + 14)):
                label = labels[i]
                pred = np.zeros_like(label) if v is None else perturb(label, rng, rng.randint(0, most))
                mv_id = None
                if v is serving:
                    mv_id = add_mask_version(s, store, project, images[i], pred, source="prediction").mask_version.id
                dice = correction_dice(pred, label, 2) if i < 56 else None
                s.add(
                    Prediction(
                        image_id=images[i].id,
                        model_version_id=v.id if v is not None else None,
                        model_version_uid=v.uid if v is not None else "untrained",
                        mask_version_id=mv_id,
                        score=0.8,
                        uncertainty=0.2,
                        correction_dice=dice,
                    )
                )
        for r in range(6):
            status = ("succeeded", "succeeded", "failed", "succeeded", "succeeded", "running")[r]
            s.add(
                TrainingRun(
                    project_id=pid,
                    trigger=("annotations", "annotations", "schedule", "manual", "annotations", "annotations")[r],
                    status=status,
                    progress={
                        "phase": "training",
                        "epoch": 12,
                        "step": 480,
                        "loss": 0.2831,
                        "val_dice": 0.772,
                        "fraction": 0.46,
                    }
                    if status == "running"
                    else {"phase": status, "epochs": 24},
                    worker="celery@gpu-node-1",
                    device="cuda:0 (NVIDIA RTX A5000)",
                    error="CheckpointError: the serving checkpoint of p1-20260116T101500-3f2a1c changed on disk (sha256 mismatch)"
                    if status == "failed"
                    else None,
                    model_version_id=versions[r + 1].id if status == "succeeded" else None,
                    created_at=BASE + dt.timedelta(days=2 * r + 1),
                    started_at=BASE + dt.timedelta(days=2 * r + 1, minutes=1),
                    finished_at=None if status == "running" else BASE + dt.timedelta(days=2 * r + 1, minutes=31),
                    attempts=1,
                )
            )
        project.retrain_pending = True
    engine.dispose()
    return pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="ui-shots-"))
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'sonoseg.db'}",
        basic_auth_user=USER,
        basic_auth_password=PASSWORD,
        label_studio_url="http://labelstudio.hospital.local:8080",
        model_poll_seconds=3600,
    )
    pid = build(settings)
    app = create_app(settings, start_background=False)
    state: AppState = app.extensions["sonoseg"]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    args.out.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        context = browser.new_context(
            http_credentials={"username": USER, "password": PASSWORD}, viewport={"width": 1360, "height": 900}
        )
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        shots = [("overview", "/ui/")] + [(name, f"/ui/projects/{pid}/{name}") for name in PAGES]
        for name, path in shots:
            page.goto(url + path)
            if name in ("dataset", "review"):
                ui_state(app).refresher.wait(120)
                page.wait_for_function("() => !document.getElementById('compute-progress')", timeout=120_000)
                page.wait_for_load_state("networkidle")
            target = args.out / f"ui_{name}.png"
            page.screenshot(path=str(target), full_page=True)
            print(f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        browser.close()
    server.shutdown()
    state.close()
    if errors:
        raise SystemExit(f"console errors: {errors}")


if __name__ == "__main__":
    main()

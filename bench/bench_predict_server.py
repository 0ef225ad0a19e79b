"""/predict through the real HTTP server vs the bare model, one 512x512 task, same process, same run.

The server is ``create_app`` on a temporary SQLite database under werkzeug's threaded server,
serving a random-weight checkpoint of ``--preset`` (speed does not depend on the weights) through
the normal ModelHolder; the task's image comes from a local-files root, as with Label Studio's
local storage. Timings alternate server and bare calls, so machine load hits both alike.

- ``predictor``: ``Predictor.predict([frame])`` of the very predictor the server holds: the bare
  model forward with its own pre/post-processing (resample, z-score, softmax, resize, argmax),
  run in a fresh thread like each werkzeug request (see :func:`in_fresh_thread`).
- ``network``: the network's forward alone on the resampled frame (for reference).
- ``server warm``: POST /predict for a task whose image is already stored (Label Studio asks
  again, or another user opens the task): HTTP, JSON, image from the store, model, RLE, recording.
- ``server cold``: POST /predict for a new task id on the same file: the image is also read,
  decoded and hashed (deduplicated by pixels).

Then 20 concurrent single-task requests: failures (must be 0) and latencies.

    .venv/bin/python bench/bench_predict_server.py            # cpu_small, 15 repeats
    .venv/bin/python bench/bench_predict_server.py --preset cpu_small_unet --repeats 30
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.api.app import AppState, create_app
from backend.db.migrate import upgrade
from backend.db.models import Project
from backend.db.session import make_engine, unit_of_work
from backend.imaging.io import encode_png, read_image
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.model.checkpoint import Checkpoint, save_checkpoint
from backend.model.data import prepare_image
from backend.model.networks import build_model
from backend.model.spec import preset_spec
from backend.services.versions import promote, register_version
from backend.settings import Settings

SHARED = ROOT.parent / "shared" / "data" / "usgra-seg" / "images" / "0000.png"
PROJECT = "1.1700000000"


def frame() -> tuple[np.ndarray, str]:
    if SHARED.exists():
        return read_image(SHARED)[0].pixels, "usgra-seg images/0000.png"
    rng = np.random.default_rng(0)
    return rng.gamma(2.0, 25.0, size=(512, 512)).clip(0, 255).astype(np.uint8), "generated speckle"


def in_fresh_thread(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes in a new thread: werkzeug runs each request in a new thread, and on
    this CPU torch calls in the main thread measured up to 10x slower than in other threads, so
    the baseline runs where the server's model runs."""
    elapsed: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        fn()
        elapsed.append(time.perf_counter() - t0)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return elapsed[0]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--concurrent", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no request lines in the output

    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    url = f"sqlite:///{tmp / 'sonoseg.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    root = tmp / "docroot"
    root.mkdir()
    pixels, source = frame()
    (root / "frame.png").write_bytes(encode_png(pixels))
    image_url = "/data/local-files/?d=frame.png"

    spec = preset_spec(args.preset, ("Nerve", "Vessel"))
    torch.manual_seed(0)
    ckpt = tmp / "model.safetensors"
    save_checkpoint(ckpt, Checkpoint(spec=spec, state_dict=build_model(spec).state_dict()))

    settings = Settings(
        data_dir=tmp / "data", database_url=url, local_files_root=root, device="cpu", model_poll_seconds=3600
    )
    app = create_app(settings, start_background=False)
    state: AppState = app.extensions["sonoseg"]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    http = requests.Session()
    http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=args.concurrent))

    served_uid = ""  # set once the benchmark model is registered

    def post(task_id: int, session: requests.Session = http) -> float:
        body = {
            "tasks": [{"id": task_id, "data": {"image": image_url}}],
            "project": PROJECT,
            "label_config": DEFAULT_LABEL_CONFIG,
        }
        t0 = time.perf_counter()
        resp = session.post(f"{base}/predict", json=body, timeout=120)
        elapsed = time.perf_counter() - t0
        resp.raise_for_status()
        (item,) = resp.json()["results"]
        if item["model_version"] != served_uid:
            raise RuntimeError(f"served {item['model_version']!r}, not the benchmark model")
        return elapsed

    try:
        http.post(f"{base}/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG}).raise_for_status()
        blob = state.store.put_file("checkpoints", ckpt, ".safetensors")
        with unit_of_work(state.factory) as session:
            project = session.query(Project).one()
            version = register_version(
                session, project, arch=spec.arch, checkpoint_key=blob.key, checkpoint_sha256=blob.sha256
            )
            promote(session, version, reason="benchmark model")
            served_uid = version.uid
        state.holder.refresh()
        served = state.holder.get(project.id)
        if served is None:
            raise RuntimeError("the benchmark model did not load")
        predictor = served.predictor
        net_input = torch.from_numpy(prepare_image(pixels, spec)[None, None])

        # Warm-up: first calls pay one-off costs (allocator, lazy imports, first image download).
        def forward() -> None:
            with torch.inference_mode():
                predictor.model(net_input)

        for _ in range(3):
            post(1)
            in_fresh_thread(lambda: predictor.predict([pixels]))
        bare, net, warm, cold = [], [], [], []
        for i in range(args.repeats):
            bare.append(in_fresh_thread(lambda: predictor.predict([pixels])))
            net.append(in_fresh_thread(forward))
            warm.append(post(1))
            cold.append(post(1000 + i))

        barrier = threading.Barrier(args.concurrent)
        failures: list[str] = []

        def concurrent_one(i: int) -> float:
            session = requests.Session()
            barrier.wait()
            try:
                return post(5000 + i, session)
            except (requests.RequestException, RuntimeError, ValueError) as exc:  # counted, reported
                failures.append(f"{type(exc).__name__}: {exc}")
                return float("nan")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrent) as pool:
            latencies = list(pool.map(concurrent_one, range(args.concurrent)))
        burst = time.perf_counter() - t0
    finally:
        server.shutdown()
        state.close()

    b = median_ms(bare)
    print(
        f"preset {args.preset} ({spec.arch}), frame {pixels.shape[1]}x{pixels.shape[0]} ({source}), "
        f"torch threads {args.threads}, {args.repeats} repeats, medians"
    )
    print(f"  network forward      {median_ms(net):8.1f} ms")
    print(f"  predictor (baseline) {b:8.1f} ms   1.00x")
    for name, samples in (("server warm", warm), ("server cold", cold)):
        m = median_ms(samples)
        paired = statistics.median(s - x for s, x in zip(samples, bare, strict=True)) * 1e3
        verdict = "within 15%" if m <= 1.15 * b else "OVER 15%"
        print(f"  /predict {name:11s} {m:8.1f} ms   {m / b:.2f}x  ({verdict}; median paired overhead {paired:+.1f} ms)")
    ok = [x for x in latencies if not math.isnan(x)]
    print(
        f"{args.concurrent} concurrent single-task /predict: {len(failures)} failed, "
        f"latency median {median_ms(ok):.0f} ms, max {max(ok) * 1e3:.0f} ms, all done in {burst:.1f} s"
    )
    for failure in failures[:5]:
        print(f"  failure: {failure}")


if __name__ == "__main__":
    main()

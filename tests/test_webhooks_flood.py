"""A webhook flood over real HTTP: 1000 events (plus re-deliveries) from 16 threads, zero lost.

The server runs as Label Studio sees it: a threaded HTTP server with the background drainer on,
so events are recorded while earlier ones are being processed.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from sqlalchemy import func, select

from backend.api.app import AppState, create_app
from backend.db.models import MaskVersion, WebhookEvent
from backend.db.session import unit_of_work
from backend.settings import Settings
from tests.support.frames import png_bytes, synthetic_frame
from tests.support.payloads import annotation_event
from tests.support.processes import wait_for
from tests.support.servers import ServedApp

EVENTS = 1000
TASKS = 100
REDELIVERED = 100


@pytest.mark.slow
def test_a_flood_of_webhooks_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "docroot"
    root.mkdir()
    masks = {}
    for t in range(TASKS):
        image, mask = synthetic_frame(t, size=(48, 64))
        (root / f"t{t}.png").write_bytes(png_bytes(image))
        masks[t] = mask
    payloads = [
        annotation_event(
            "ANNOTATION_CREATED",
            10_000 + i,
            500 + i % TASKS,
            f"/data/local-files/?d=t{i % TASKS}.png",
            masks[i % TASKS],
        )
        for i in range(EVENTS)
    ]
    deliveries = payloads + random.Random(0).sample(payloads, REDELIVERED)
    random.Random(1).shuffle(deliveries)

    app = create_app(settings.replace(local_files_root=root), start_background=True)
    state: AppState = app.extensions["sonoseg"]
    served = ServedApp(app)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))
    try:

        def deliver(payload: dict[str, object]) -> tuple[int, str]:
            resp = session.post(f"{served.url}/webhook", json=payload, timeout=30)
            return resp.status_code, resp.json().get("status", "")

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(deliver, deliveries))
        assert {code for code, _ in answers} == {200}
        assert sum(1 for _, status in answers if status == "recorded") == EVENTS

        def all_processed() -> bool:
            with unit_of_work(state.factory) as s:
                return not s.scalar(select(func.count()).where(WebhookEvent.status == "pending"))

        wait_for(all_processed, 180, "the drainer to process every event")
    finally:
        served.close()
        state.close()

    with unit_of_work(state.factory) as s:
        statuses = dict(s.execute(select(WebhookEvent.status, func.count()).group_by(WebhookEvent.status)).all())
        assert statuses == {"processed": EVENTS}
        annotation_ids = set(s.scalars(select(MaskVersion.ls_annotation_id).where(MaskVersion.source == "annotation")))
        assert annotation_ids == {10_000 + i for i in range(EVENTS)}
        current = s.scalar(select(func.count()).where(MaskVersion.is_current))
        assert current == TASKS  # one current label per image: the newest annotation
    assert np.unique(np.concatenate([m.ravel() for m in masks.values()])).tolist() == [0, 1, 2]

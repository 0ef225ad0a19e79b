"""The dashboard in a real headless Chromium (playwright), served over HTTP by ``ServedApp``:

- every page loads with no console error and no uncaught exception (the pages run under a strict
  Content-Security-Policy, so an inline script or style would show up here as an error);
- the model timeline draws one point per version of the fixture project;
- the training-run page follows a run without a reload: once with the run's row advanced from the
  test, once with a REAL worker (``sonoseg worker --pool solo --beat``) training the tiny preset;
- promote and rollback through the buttons (confirmation dialogs accepted, or dismissed) change
  the version that ``/setup`` returns.

Skipped, saying why, when playwright or a Chromium binary is missing (no browser is downloaded).
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from backend.db.models import Project, TrainingRun
from backend.db.session import unit_of_work
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.settings import Settings
from tests.support.servers import ServedApp
from tests.test_ui import LS_PROJECT, PASSWORD, USER, Built, Env, make_env, populate, setup_project

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (/usr/bin/chromium or `chromium` on PATH)"),
    # One group with the other tests that start workers: on 2 cores, two of them at once starve each other.
    pytest.mark.xdist_group("sonoseg-workers"),
    # The browser checks the pages; their SQL runs on both databases in tests/test_ui.py.
    pytest.mark.parametrize("db_url", ["sqlite_url"], indirect=True),
    pytest.mark.sqlite,
]

PAGES = ("models", "effort", "runs", "dataset", "review", "next")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Site:
    """The app on a loopback port and a browser page that logs in with basic auth and collects errors."""

    def __init__(self, env: Env, browser: Any) -> None:
        self.env = env
        self.server = ServedApp(env.app)
        self.context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on(
            "console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def url(self, path: str) -> str:
        return self.server.url + path

    def setup_uid(self) -> str:
        resp = requests.post(
            self.url("/setup"),
            json={"project": f"{LS_PROJECT}.1700000000", "schema": DEFAULT_LABEL_CONFIG},
            auth=(USER, PASSWORD),
            timeout=10,
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["model_version"])

    def close(self) -> None:
        self.context.close()
        self.server.close()


@pytest.fixture
def site(settings: Settings, browser: Any) -> Iterator[tuple[Site, Built]]:
    env = make_env(settings)
    built = populate(env, setup_project(env), images=12, versions=6, runs=3)
    s = Site(env, browser)
    yield s, built
    s.close()
    from backend.api.ui.views import ui_state

    ui_state(env.app).refresher.wait(30)
    env.state.close()


def test_every_page_loads_without_console_errors(site: tuple[Site, Built]) -> None:
    s, built = site
    page = s.page
    page.goto(s.url("/ui/"))
    assert page.locator(f'tr[data-project="{built.project_id}"]').count() == 1
    for name in PAGES:
        page.goto(s.url(f"/ui/projects/{built.project_id}/{name}"))
        assert page.locator("header nav a.active").inner_text() != ""
        if name in ("dataset", "review"):  # computed in the background: the page reloads itself when done
            page.wait_for_function("() => !document.getElementById('compute-progress')", timeout=60_000)
    page.goto(s.url(f"/ui/projects/{built.project_id}/dataset"))
    assert page.locator("#classes tr[data-class]").count() == 2
    page.goto(s.url(f"/ui/projects/{built.project_id}/review"))
    images = page.locator("#review-items img")
    assert images.count() > 0
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#review-items img')).every(i => i.complete && i.naturalWidth > 0)"
    )
    assert s.errors == []


def test_model_timeline_shows_one_point_per_version_and_marks_the_serving_one(site: tuple[Site, Built]) -> None:
    s, built = site
    s.page.goto(s.url(f"/ui/projects/{built.project_id}/models"))
    points = s.page.locator("svg#chart-time circle.version-point")
    assert points.count() == len(built.uids)
    assert sorted(points.evaluate_all("els => els.map(e => e.dataset.version)")) == sorted(built.uids)
    assert s.page.locator("svg#chart-time circle.version-point.serving").get_attribute("data-version") == built.serving
    assert s.page.locator("#versions tbody tr[data-version]").count() == len(built.uids)
    assert s.errors == []


def test_promote_and_rollback_buttons_ask_first_and_change_the_version_setup_returns(
    site: tuple[Site, Built],
) -> None:
    s, built = site
    page, candidate = s.page, built.uids[-1]
    assert s.setup_uid() == built.serving
    page.goto(s.url(f"/ui/projects/{built.project_id}/models"))

    dialogs: list[str] = []
    page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.click(f'button.promote[data-version="{candidate}"]')
    page.wait_for_timeout(300)
    assert dialogs and candidate in dialogs[0]
    assert s.setup_uid() == built.serving  # dismissed: nothing happened

    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        page.click(f'button.promote[data-version="{candidate}"]')
    assert page.locator("#notice").inner_text() == f"{candidate} is serving now"
    assert page.locator("#serving-uid").inner_text() == candidate
    assert s.setup_uid() == candidate

    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        page.click("#rollback")
    assert page.locator("#serving-uid").inner_text() == built.serving
    assert s.setup_uid() == built.serving
    assert s.errors == []


def _watch_runs(s: Site, project_id: int) -> None:
    s.page.goto(s.url(f"/ui/projects/{project_id}/runs"))
    s.page.evaluate("window.__sameDocument = true")


def _row_status(s: Site, run_id: int) -> str | None:
    row = s.page.locator(f'#runs-body tr[data-run="{run_id}"]')
    return row.get_attribute("data-status") if row.count() else None


def test_training_run_page_updates_without_reload_as_the_run_row_advances(site: tuple[Site, Built]) -> None:
    s, built = site
    with unit_of_work(s.env.factory) as session:
        run = session.scalars(
            select(TrainingRun).where(TrainingRun.project_id == built.project_id, TrainingRun.status == "running")
        ).one()
        run_id = run.id
        run.progress = {"phase": "training", "epoch": 1, "loss": 0.9, "fraction": 0.1}
    _watch_runs(s, built.project_id)
    epoch = s.page.locator(f'#runs-body tr[data-run="{run_id}"] td.epoch')
    assert epoch.inner_text() == "1"
    for e in (2, 3):
        with unit_of_work(s.env.factory) as session:
            session.get_one(TrainingRun, run_id).progress = {
                "phase": "training",
                "epoch": e,
                "loss": 0.9 / e,
                "fraction": e / 4,
            }
        s.page.wait_for_function(
            f"() => document.querySelector('#runs-body tr[data-run=\"{run_id}\"] td.epoch').textContent === '{e}'",
            timeout=10_000,
        )
    with unit_of_work(s.env.factory) as session:
        r = session.get_one(TrainingRun, run_id)
        r.status, r.error, r.finished_at = "failed", "InvalidInput: no labelled training image", dt.datetime.now(dt.UTC)
    s.page.wait_for_selector(f'tr[data-run-error="{run_id}"]', timeout=10_000)
    assert "no labelled training image" in s.page.locator(f'tr[data-run-error="{run_id}"]').inner_text()
    assert _row_status(s, run_id) == "failed"
    assert s.page.evaluate("window.__sameDocument") is True  # updated in place, never reloaded
    assert s.errors == []


@pytest.mark.slow
def test_training_run_page_follows_a_real_worker_from_queued_to_succeeded(
    settings: Settings, browser: Any, tmp_path: Path
) -> None:
    """A real worker with beat trains the tiny preset; the open page shows each state as it comes."""
    from backend.model.synthetic import make_blob_pairs
    from backend.services.images import SourceInfo, add_image
    from backend.services.masks import add_mask_version
    from backend.services.training.requests import request_training
    from tests.support.processes import WORKER_PRESET, start_worker

    if not settings.is_sqlite:
        pytest.skip("the real-worker test runs on SQLite with the embedded broker")
    settings = settings.replace(
        model_preset=WORKER_PRESET,
        device="cpu",
        train_max_minutes=0.15,
        dispatch_interval_seconds=1.0,
        train_heartbeat_seconds=0.5,
        retrain_cron="off",
        repredict_after_promotion=False,
        model_poll_seconds=0.5,
    )
    env = make_env(settings)
    s = Site(env, browser)
    try:
        pid = setup_project(env)
        with unit_of_work(env.factory) as session:
            project = session.get_one(Project, pid)
            project.auto_retrain = False
            for i, (frame, mask) in enumerate(make_blob_pairs(6, size=(96, 96), seed=3)):
                image = add_image(
                    session,
                    env.store,
                    project,
                    frame,
                    subject=f"w{i}",
                    source=SourceInfo("import"),
                    split="train" if i < 4 else "val",
                ).image
                add_mask_version(session, env.store, project, image, mask.astype("uint8"), source="import")
            run = request_training(session, project, "manual")
            assert run is not None
            run_id = run.id
        _watch_runs(s, pid)
        assert _row_status(s, run_id) == "queued"
        seen: list[str] = []
        with start_worker(env.settings, tmp_path / "worker.log") as worker:
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                status = _row_status(s, run_id)
                phase = s.page.locator(f'#runs-body tr[data-run="{run_id}"] td.phase').inner_text()
                state = f"{status}:{phase.split(' ')[0] if phase else ''}"
                if not seen or seen[-1] != state:
                    seen.append(state)
                if status in ("succeeded", "failed"):
                    break
                worker.check_alive("the run to finish")
                s.page.wait_for_timeout(250)
        print("observed run states:", seen)
        assert seen[0].startswith("queued"), seen
        assert any(x.startswith("running") for x in seen), seen
        assert seen[-1].startswith("succeeded"), (seen, worker.tail())
        row = s.page.locator(f'#runs-body tr[data-run="{run_id}"]')
        assert "cpu" in row.inner_text() and row.locator("code").inner_text().startswith(f"p{pid}-")
        assert s.page.evaluate("window.__sameDocument") is True
        assert s.errors == []
    finally:
        s.close()
        env.state.close()

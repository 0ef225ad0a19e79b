"""The layer rules of docs/architecture.md hold, and the check that enforces them can fail.

The contracts live in pyproject.toml ([tool.importlinter]); ``make lint`` runs them too. This test
runs the same check on the repository, then on a copy with a forbidden import and with an import
cycle planted, which must each break a contract.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e .[dev])"
)


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the copy's packages, not the installed (editable) ones, are analysed.
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("backend", "workers", "cli"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_repository_keeps_every_layer_contract() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("backend/services/masks.py", "import workers.names", "Layers"),
        ("backend/services/masks.py", "import backend.api.errors", "Layers"),
        ("workers/tasks/training.py", "import backend.api.state", "Layers"),
        ("backend/db/base.py", "import backend.services.masks", "Layers"),
        ("backend/model/spec.py", "import backend.model.networks", "No import cycles"),
        ("backend/services/sync.py", "import backend.services.reconciliation", "No import cycles"),
    ],
)
def test_a_planted_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, planted: str, contract: str) -> None:
    root = _copy(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{planted}  # planted by tests/test_layers.py\n")
    done = _lint(root)
    assert done.returncode != 0, done.stdout
    broken = [line for line in done.stdout.splitlines() if line.rstrip().endswith("BROKEN")]
    assert any(line.startswith(contract) for line in broken), done.stdout

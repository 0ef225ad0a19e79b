"""Replay every file of fuzz/corpus/** through the fuzz harness (no atheris needed).

The seeds (fuzz/make_seeds.py) and every reproducer saved after a fix (``crash-*``, ``oom-*``,
``timeout-*``) must end in an acceptable outcome: frames or a SonosegError for the image
readers, a mask of the declared size or InvalidInput for the RLE decoder. Anything else is a
regression of a bug the fuzzers once found.

The files are replayed in one fresh subprocess (about a second), so that each file's time and
peak-RSS growth are measured from a low baseline: a reproducer of a memory blow-up inside a
native reader (GDCM allocating 775 MB for a 792-byte DICOM) fails here on memory, and a
segfault fails the test instead of killing the test run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
TARGETS = {"image_readers": "check_image", "rle": "check_rle"}
SECONDS_PER_FILE = 3.0
RSS_GROWTH_LIMIT_MB = 256
FILES = sorted(path for target in TARGETS for path in (CORPUS / target).glob("*") if path.is_file())

REPLAY = r"""
import json, resource, sys, time, traceback
sys.path.insert(0, sys.argv[1])
from fuzz import harness
from backend.labelstudio.rle import warmup
warmup()
checks = {"image_readers": harness.check_image, "rle": harness.check_rle}
for line in sys.stdin:
    path = line.rstrip("\n")
    target = path.rsplit("/", 2)[-2]
    data = open(path, "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        outcome, error = checks[target](data), None
    except BaseException:
        outcome, error = None, traceback.format_exc(limit=6)
    seconds = time.perf_counter() - started
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"path": path, "outcome": outcome, "error": error, "seconds": seconds, "rss_mb": growth}), flush=True)
"""


@pytest.fixture(scope="module")
def replayed() -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", REPLAY, str(ROOT)],
        check=False,
        input="".join(f"{path}\n" for path in FILES),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["path"]] = record
    if done.returncode != 0:
        last = FILES[len(results)] if len(results) < len(FILES) else None
        results["__crash__"] = {"returncode": done.returncode, "file": str(last), "stderr": done.stderr[-3000:]}
    return results


def test_every_target_has_a_corpus() -> None:
    for target in TARGETS:
        assert any((CORPUS / target).glob("seed-*")), f"fuzz/corpus/{target} has no seeds: run fuzz/make_seeds.py"


def test_the_committed_corpus_stays_small() -> None:
    total = sum(path.stat().st_size for path in FILES)
    assert total < 400 * 1024, f"fuzz/corpus holds {total} bytes; keep it to a few hundred KB"


def test_the_replay_process_did_not_crash(replayed: dict[str, dict[str, Any]]) -> None:
    assert "__crash__" not in replayed, replayed.get("__crash__")


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_corpus_file_has_an_acceptable_outcome(path: Path, replayed: dict[str, dict[str, Any]]) -> None:
    record = replayed.get(str(path))
    assert record is not None, f"{path.name} was never replayed (the replay process died before it)"
    assert record["error"] is None, f"{path.name}: a finding:\n{record['error']}"
    assert record["seconds"] < SECONDS_PER_FILE, f"{path.name} took {record['seconds']:.1f} s"
    assert record["rss_mb"] < RSS_GROWTH_LIMIT_MB, f"{path.name} grew the peak RSS by {record['rss_mb']:.0f} MiB"


def test_seeds_still_exercise_the_decoders(replayed: dict[str, dict[str, Any]]) -> None:
    """The valid seeds must decode (a seed that is refused no longer seeds anything useful)."""
    decoded = [Path(p).name for p, r in replayed.items() if r.get("outcome") in {"frames", "mask"}]
    for prefix in ("png", "jpeg", "tiff", "bmp", "dicom", "nifti", "mha", "rle"):
        assert any(name.startswith(f"seed-{prefix}") for name in decoded), f"no {prefix} seed decodes"

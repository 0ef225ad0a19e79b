"""atheris target: backend.imaging.io.read_image_bytes over every format it sniffs.

    .venv/bin/python fuzz/fuzz_image_readers.py WORK_DIR fuzz/corpus/image_readers -max_total_time=60

(``make fuzz FUZZ_SECONDS=60`` runs it with the right flags.) Acceptable outcomes are in
fuzz/harness.py: frames, or a SonosegError subclass; anything else (another exception, a crash
in SimpleITK, a hang past -timeout, memory past -rss_limit_mb) is a finding. Save the
reproducer under fuzz/corpus/image_readers/ once fixed: tests/adversarial/test_fuzz_corpus.py
replays it forever.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["backend", "fuzz"]):
    from fuzz.harness import check_image


def test_one_input(data: bytes) -> None:
    check_image(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

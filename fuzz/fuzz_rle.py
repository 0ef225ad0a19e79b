"""atheris target: the brush RLE decoder (input bytes -> integer list + height/width).

    .venv/bin/python fuzz/fuzz_rle.py WORK_DIR fuzz/corpus/rle -max_total_time=60

(``make fuzz FUZZ_SECONDS=60`` runs it with the right flags.) How bytes become a case is
``fuzz.harness.rle_case``; acceptable outcomes are a mask of the declared size or InvalidInput.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The numba kernels run as plain Python here (SONOSEG_FUZZ_JIT=1 keeps them compiled): atheris
# then sees their branches (coverage guidance inside the chunk walk), and numpy bounds-checks
# every index, so a read past the stream is an IndexError instead of a silent stray read.
# The corpus replay (tests/adversarial/test_fuzz_corpus.py) runs the compiled kernels.
if os.environ.get("SONOSEG_FUZZ_JIT") != "1":
    os.environ["NUMBA_DISABLE_JIT"] = "1"

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["backend", "fuzz"]):
    from backend.labelstudio import rle_kernels  # noqa: F401  (instrumented too, when not compiled)
    from fuzz.harness import check_rle

from backend.labelstudio.rle import warmup

warmup()  # load the numba kernels once, before the first input is timed


def test_one_input(data: bytes) -> None:
    check_rle(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""Split a labelled folder into an active-learning pool and an evaluation part, as symlinks.

``sonoseg al simulate`` is tuned on a validation part of the pool, never on a dataset's test set.
This makes that part reproducibly: the sorted file stems of IMAGES are shuffled with
``random.Random(seed)``; the first ``--eval`` become ``OUT/val/{images,masks}``, the rest
``OUT/pool/{images,masks}``. Files are symlinked, not copied (datasets must not be copied around).

    .venv/bin/python bench/make_al_split.py --images /work/shared/data/usgra-seg/images \\
        --masks /work/shared/data/usgra-seg/masks --out /tmp/al_usgra --eval 44 --seed 12345
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval", type=int, default=44)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    images = {p.stem: p for p in sorted(args.images.iterdir()) if p.is_file()}
    masks = {p.stem: p for p in sorted(args.masks.iterdir()) if p.is_file()}
    stems = sorted(set(images) & set(masks))
    if args.eval >= len(stems):
        raise SystemExit(f"--eval {args.eval} leaves no pool out of {len(stems)} pairs")
    random.Random(args.seed).shuffle(stems)
    for part, chosen in (("val", stems[: args.eval]), ("pool", stems[args.eval :])):
        for kind, files in (("images", images), ("masks", masks)):
            folder = args.out / part / kind
            folder.mkdir(parents=True, exist_ok=True)
            for stem in chosen:
                link = folder / files[stem].name
                if not link.exists():
                    link.symlink_to(files[stem].resolve())
        print(f"{part}: {len(chosen)} pairs in {args.out / part}")


if __name__ == "__main__":
    main()

"""Train / val / test assignment by subject, so one subject's frames never straddle splits.

Pure functions. The split is a deterministic hash of (project salt, subject pseudonym), so it is
stable as the dataset grows: adding subjects never moves an existing subject to another split,
and a model's held-out images stay held out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from backend.errors import InvalidInput


@dataclass(frozen=True)
class SplitFractions:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        parts = (self.train, self.val, self.test)
        if any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
            raise InvalidInput(f"split fractions must be >= 0 and sum to 1, got {parts}")


def assign_split(subject: str, salt: str = "", fractions: SplitFractions = SplitFractions()) -> str:
    """The split for ``subject``: 'train', 'val' or 'test'."""
    digest = hashlib.sha256(f"{salt}\x00{subject}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.val:
        return "val"
    return "test"

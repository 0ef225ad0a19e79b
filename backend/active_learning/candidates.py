"""The values a selection strategy works on, and the protocol every strategy follows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, eq=False)
class Candidate:
    """One unlabelled image as the serving model saw it (see :mod:`backend.model.scores`).

    ``embedding`` is a 1-D float32 vector, L2-normalised, so the dot product of two candidates
    is their cosine similarity (consecutive cine frames come out near 1).
    """

    image_id: int
    entropy: float  # foreground-region predictive entropy, [0, 1], higher = less sure
    tta_disagreement: float  # flip-TTA disagreement, [0, 1]
    boundary_uncertainty: float  # uncertainty along the predicted object boundaries, [0, 1]
    foreground_fraction: float  # share of pixels predicted as any foreground class, [0, 1]
    embedding: NDArray[np.float32]
    subject: str | None = None  # pseudonymised subject, when known (diversity across patients)


class Strategy(Protocol):
    """Ranks a pool: returns up to ``n`` distinct image ids of ``pool``, best first.

    Deterministic for a given ``rng`` state; never returns an id that is not in ``pool``.
    ``labelled``: the images already labelled, scored by the same model (what is covered); a
    strategy reads it only when its ``uses_labelled`` is true, so callers may skip scoring them
    otherwise (:func:`uses_labelled`).
    """

    name: str

    def select(
        self, pool: Sequence[Candidate], n: int, rng: np.random.Generator, labelled: Sequence[Candidate] = ()
    ) -> list[int]: ...


def uses_labelled(strategy: Strategy) -> bool:
    """Whether ``strategy`` reads the labelled images' scores (worth computing them)."""
    return bool(getattr(strategy, "uses_labelled", False))

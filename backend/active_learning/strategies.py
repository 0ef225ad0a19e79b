"""Selection strategies: a pool of :class:`~.candidates.Candidate` in, a ranked batch of image ids out.

Pure numpy. Every strategy returns at most ``n`` distinct ids of the pool, best first, and is
deterministic for a given ``rng`` state (a candidate listed twice counts once, by its first entry).

- ``random``: a uniform shuffle. The baseline every other strategy must beat.
- ``fg_random``: foreground-aware random (nnActive's strong baseline): a shuffle of the candidates
  whose predicted foreground fraction is above ``fg_threshold``, then, if they run out, a shuffle
  of the rest.
- ``entropy``: the top ``n`` by foreground-region entropy (ties by image id); no stochasticity, no
  diversity: the classic uncertainty sampling that picks ten consecutive cine frames of one hard clip.
- ``default``: stochastic batch acquisition (Kirsch et al., "Stochastic Batch Acquisition", TMLR
  2023) over a combined informativeness score, with near-duplicate suppression and a share of
  ``fg_random`` picks. See :class:`DefaultStrategy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from backend.active_learning.candidates import Candidate, Strategy
from backend.errors import InvalidInput

STRATEGY_NAMES = ("random", "fg_random", "entropy", "default")
# Strategies that never read a candidate's scores (a simulation need not compute them).
SCORE_FREE = frozenset({"random"})
FG_THRESHOLD = 0.001  # share of the frame predicted as foreground for "the model believes it has some"


def strategy_named(name: str, **params: Any) -> Strategy:
    """The strategy called ``name`` (one of :data:`STRATEGY_NAMES`) with ``params`` as its fields."""
    factories: dict[str, type[Any]] = {
        "random": RandomStrategy,
        "fg_random": ForegroundRandomStrategy,
        "entropy": EntropyStrategy,
        "default": DefaultStrategy,
    }
    factory = factories.get(name)
    if factory is None:
        raise InvalidInput(f"unknown strategy {name!r}; known: {', '.join(STRATEGY_NAMES)}")
    try:
        strategy: Strategy = factory(**params)
    except TypeError as exc:
        raise InvalidInput(f"strategy {name!r}: {exc}") from exc
    return strategy


@dataclass
class RandomStrategy:
    name: str = field(default="random", init=False)

    def select(self, pool: Sequence[Candidate], n: int, rng: np.random.Generator) -> list[int]:
        unique = _unique(pool)
        if n <= 0 or not unique:
            return []
        return [unique[int(i)].image_id for i in rng.permutation(len(unique))[:n]]


@dataclass
class ForegroundRandomStrategy:
    fg_threshold: float = FG_THRESHOLD
    name: str = field(default="fg_random", init=False)

    def select(self, pool: Sequence[Candidate], n: int, rng: np.random.Generator) -> list[int]:
        unique = _unique(pool)
        if n <= 0 or not unique:
            return []
        return [unique[i].image_id for i in _fg_random_order(unique, self.fg_threshold, rng)[:n]]


@dataclass
class EntropyStrategy:
    name: str = field(default="entropy", init=False)

    def select(self, pool: Sequence[Candidate], n: int, rng: np.random.Generator) -> list[int]:
        unique = _unique(pool)
        if n <= 0 or not unique:
            return []
        ranked = sorted(unique, key=lambda c: (-_finite(c.entropy), c.image_id))
        return [c.image_id for c in ranked[:n]]


@dataclass
class DefaultStrategy:
    """Power sampling over ranks of a combined score, near-duplicate suppression, a foreground-random share.

    1. **Informativeness**: each of entropy, flip-TTA disagreement and boundary uncertainty is
       turned into its rank in the pool (scaled to (0, 1]; only the order matters, so a model that
       grows surer overall, or a dataset whose frames are all uncertain, changes nothing), and the
       ranks are averaged with ``weights``.
    2. **Stochastic batch acquisition**: the pool is ordered by sampling without replacement with
       probability proportional to ``rank ** -beta`` of that combined score (Kirsch et al.'s
       soft-rank acquisition, drawn with the Gumbel-top-k trick). Taking the top ``n`` instead
       would fill the batch with the frames that are hard for one shared reason (one clip, one
       artefact); sampling spreads it, and ``beta`` sets how greedy it is (0 = uniform).
    3. **A share of foreground-aware random**: every ``1 / fg_share``-th slot (rounded: with 0.25
       the 4th, 8th, ...) is filled from a ``fg_random`` order instead, so the batch keeps at least
       that share of the strong baseline's picks however misleading the scores are.
    4. **Near-duplicate suppression**: a candidate whose embedding has cosine similarity of at
       least ``duplicate_threshold`` with an already picked one is skipped; skipped candidates are
       used only when nothing else is left. With ``centre`` (the default) similarities are taken
       after subtracting the pool's mean embedding: pooled post-activation features share a large
       common component (distinct frames have raw cosines of 0.98-0.998 on usgra-seg), and the
       threshold would otherwise have to be tuned per model and dataset.
    """

    beta: float = 1.0
    duplicate_threshold: float = 0.9
    fg_share: float = 0.25
    fg_threshold: float = FG_THRESHOLD
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # entropy, tta_disagreement, boundary_uncertainty
    centre: bool = True
    name: str = field(default="default", init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.fg_share <= 1:
            raise InvalidInput(f"fg_share must be in [0, 1], got {self.fg_share}")
        if self.beta < 0 or len(self.weights) != 3 or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise InvalidInput("beta must be >= 0 and weights three non-negative numbers, not all 0")
        self.weights = (float(self.weights[0]), float(self.weights[1]), float(self.weights[2]))

    def select(self, pool: Sequence[Candidate], n: int, rng: np.random.Generator) -> list[int]:
        unique = _unique(pool)
        if n <= 0 or not unique:
            return []
        n = min(n, len(unique))
        informative = self._sampled_order(unique, rng)
        foreground = _fg_random_order(unique, self.fg_threshold, rng)
        sim = _similarity(unique, centre=self.centre)
        picked: list[int] = []
        taken = np.zeros(len(unique), bool)
        sources = (_Cursor(informative), _Cursor(foreground))
        for slot in range(n):
            first = 1 if _is_fg_slot(slot, self.fg_share) else 0
            for source in (sources[first], sources[1 - first]):
                index = source.next_distinct(taken, picked, sim, self.duplicate_threshold)
                if index is not None:
                    break
            else:  # everything left is a near-duplicate of a pick: take them, most informative first
                index = next(int(i) for i in informative if not taken[i])
            taken[index] = True
            picked.append(index)
        return [unique[i].image_id for i in picked]

    def combined_score(self, pool: Sequence[Candidate]) -> NDArray[np.float64]:
        """The weighted mean of the three scores' pool ranks, in (0, 1]; higher = more informative."""
        columns = (
            [_finite(c.entropy) for c in pool],
            [_finite(c.tta_disagreement) for c in pool],
            [_finite(c.boundary_uncertainty) for c in pool],
        )
        w = np.asarray(self.weights, np.float64)
        ranks = np.stack([_rank01(np.asarray(col, np.float64)) for col in columns])
        out: NDArray[np.float64] = (w[:, None] * ranks).sum(0) / w.sum()
        return out

    def _sampled_order(self, pool: Sequence[Candidate], rng: np.random.Generator) -> list[int]:
        score = self.combined_score(pool)
        # 1-based rank of the combined score, best = 1 (ties by position: stable).
        order = np.argsort(-score, kind="stable")
        rank = np.empty(len(pool), np.float64)
        rank[order] = np.arange(1, len(pool) + 1)
        keys = -self.beta * np.log(rank) + rng.gumbel(size=len(pool))
        return [int(i) for i in np.argsort(-keys, kind="stable")]


class _Cursor:
    """Walks one ordering, skipping what is taken or too similar to a pick."""

    def __init__(self, order: Sequence[int]) -> None:
        self.order = order
        self.pos = 0

    def next_distinct(
        self, taken: NDArray[np.bool_], picked: list[int], sim: _Similarity, threshold: float
    ) -> int | None:
        while self.pos < len(self.order):
            index = self.order[self.pos]
            if not taken[index] and not (picked and sim.max_to(index, picked) >= threshold):
                return index
            self.pos += 1
        return None


class _Similarity:
    """Cosine similarities to the picks, computed on demand (the pool may be large)."""

    def __init__(self, vectors: NDArray[np.float64], zero: NDArray[np.bool_]) -> None:
        self.vectors = vectors
        self.zero = zero  # vectors that vanished after centring: the pool's mean frame

    def max_to(self, index: int, picked: list[int]) -> float:
        if self.zero[index]:
            return 1.0 if bool(self.zero[picked].any()) else 0.0
        return float((self.vectors[picked] @ self.vectors[index]).max())


def _similarity(pool: Sequence[Candidate], *, centre: bool) -> _Similarity:
    dims = {np.asarray(c.embedding).size for c in pool}
    if len(dims) != 1:
        raise InvalidInput(f"candidates' embeddings have different sizes: {sorted(dims)}")
    x = np.stack([np.asarray(c.embedding, np.float64).ravel() for c in pool])
    x = np.where(np.isfinite(x), x, 0.0)
    if centre and len(pool) > 1:
        x = x - x.mean(0)
    norm = np.linalg.norm(x, axis=1)
    scale = max(float(norm.max()), 1e-300)
    zero = norm <= 1e-6 * scale if centre else norm <= 1e-12
    vectors = np.where(zero[:, None], 0.0, x / np.maximum(norm, 1e-300)[:, None])
    return _Similarity(vectors, zero)


def _is_fg_slot(slot: int, share: float) -> bool:
    """Whether 0-based ``slot`` goes to the foreground-random picks: floor((k+1)s) > floor(ks)."""
    return int(np.floor((slot + 1) * share + 1e-9)) > int(np.floor(slot * share + 1e-9))


def _fg_random_order(pool: Sequence[Candidate], threshold: float, rng: np.random.Generator) -> list[int]:
    eligible = [i for i, c in enumerate(pool) if _finite(c.foreground_fraction) > threshold]
    rest = [i for i, c in enumerate(pool) if not _finite(c.foreground_fraction) > threshold]
    return [eligible[int(j)] for j in rng.permutation(len(eligible))] + [
        rest[int(j)] for j in rng.permutation(len(rest))
    ]


def _unique(pool: Sequence[Candidate]) -> list[Candidate]:
    seen: set[int] = set()
    out: list[Candidate] = []
    for c in pool:
        if c.image_id not in seen:
            seen.add(c.image_id)
            out.append(c)
    return out


def _rank01(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Average ranks scaled to (0, 1]: the largest value gets 1, ties share their mean rank."""
    n = values.size
    order = np.argsort(values, kind="stable")
    ranks = np.empty(n, np.float64)
    ranks[order] = np.arange(1, n + 1)
    sorted_values = values[order]
    # Average the ranks of tied values.
    _, start, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for s, c in zip(start, counts, strict=True):
        if c > 1:
            ranks[order[s : s + c]] = s + (c + 1) / 2
    return ranks / n


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.0

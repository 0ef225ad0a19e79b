"""Selection strategies: a pool of :class:`~.candidates.Candidate` in, a ranked batch of image ids out.

Pure numpy (and scipy's k-means). Every strategy returns at most ``n`` distinct ids of the pool, best
first, and is deterministic for a given ``rng`` state (a candidate listed twice counts once, by its
first entry). ``labelled`` (optional) are the already labelled images as the same model scored
them; only strategies with ``uses_labelled`` read it, to know which part of the data is covered.

- ``random``: a uniform shuffle. The baseline every other strategy must beat.
- ``fg_random``: foreground-aware random (nnActive's strong baseline): a shuffle of the candidates
  whose predicted foreground fraction is above ``fg_threshold``, then, if they run out, a shuffle
  of the rest.
- ``entropy``: the top ``n`` by foreground-region entropy (ties by image id); no stochasticity, no
  diversity: the classic uncertainty sampling that picks ten consecutive cine frames of one hard clip.
- ``coverage``: typical images of the embedding clusters the labelled set does not cover yet
  (TypiClust), with the same share of ``fg_random`` picks. See :class:`CoverageStrategy`.
- ``power``: stochastic batch acquisition (Kirsch et al., "Stochastic Batch Acquisition", TMLR
  2023) over a combined informativeness score, with near-duplicate suppression and a share of
  ``fg_random`` picks. See :class:`PowerStrategy`.
- ``default``: what a project uses unless told otherwise: the strategy the latest tuning run on a
  validation split chose (``coverage`` since 2026-12-03, with its informative ramp since
  2026-12-04; docs/active-learning.md has the runs).
  See :class:`DefaultStrategy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from backend.active_learning.candidates import Candidate, Strategy
from backend.errors import InvalidInput

STRATEGY_NAMES = ("random", "fg_random", "entropy", "power", "coverage", "default")
# Strategies that never read a candidate's scores (a simulation need not compute them).
SCORE_FREE = frozenset({"random"})
FG_THRESHOLD = 0.001  # share of the frame predicted as foreground for "the model believes it has some"


def strategy_named(name: str, **params: Any) -> Strategy:
    """The strategy called ``name`` (one of :data:`STRATEGY_NAMES`) with ``params`` as its fields."""
    factories: dict[str, type[Any]] = {
        "random": RandomStrategy,
        "fg_random": ForegroundRandomStrategy,
        "entropy": EntropyStrategy,
        "power": PowerStrategy,
        "coverage": CoverageStrategy,
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

    def select(
        self, pool: Sequence[Candidate], n: int, rng: np.random.Generator, labelled: Sequence[Candidate] = ()
    ) -> list[int]:
        unique = _unique(pool)
        if n <= 0 or not unique:
            return []
        return [unique[int(i)].image_id for i in rng.permutation(len(unique))[:n]]


@dataclass
class ForegroundRandomStrategy:
    fg_threshold: float = FG_THRESHOLD
    name: str = field(default="fg_random", init=False)

    def select(
        self, pool: Sequence[Candidate], n: int, rng: np.random.Generator, labelled: Sequence[Candidate] = ()
    ) -> list[int]:
        unique = _unique(pool)
        if n <= 0 or not unique:
            return []
        return [unique[i].image_id for i in _fg_random_order(unique, self.fg_threshold, rng)[:n]]


@dataclass
class EntropyStrategy:
    name: str = field(default="entropy", init=False)

    def select(
        self, pool: Sequence[Candidate], n: int, rng: np.random.Generator, labelled: Sequence[Candidate] = ()
    ) -> list[int]:
        unique = _unique(pool)
        if n <= 0 or not unique:
            return []
        ranked = sorted(unique, key=lambda c: (-_finite(c.entropy), c.image_id))
        return [c.image_id for c in ranked[:n]]


@dataclass
class PowerStrategy:
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
    name: str = field(default="power", init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.fg_share <= 1:
            raise InvalidInput(f"fg_share must be in [0, 1], got {self.fg_share}")
        if self.beta < 0 or len(self.weights) != 3 or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise InvalidInput("beta must be >= 0 and weights three non-negative numbers, not all 0")
        self.weights = (float(self.weights[0]), float(self.weights[1]), float(self.weights[2]))

    def select(
        self, pool: Sequence[Candidate], n: int, rng: np.random.Generator, labelled: Sequence[Candidate] = ()
    ) -> list[int]:
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


@dataclass
class CoverageStrategy:
    """The most typical image of each embedding cluster that no labelled image covers yet (TypiClust).

    Why: with tens of labels, which *kinds* of frame are labelled matters more than which single
    frames are hardest. Uncertainty sampling in that regime picks outliers and one hard clip
    (Hacohen et al., "Active Learning on a Budget", ICML 2022; nnActive's finding that uncertainty
    rarely beats foreground-aware random on medical segmentation). So:

    1. The labelled and the unlabelled images' embeddings (pool-centred, L2-normalised, as for the
       near-duplicate test of ``power``) are clustered by k-means (scipy, k-means++ seeding from
       ``rng``) into ``len(labelled) + min(n, max_new_clusters)`` clusters: as many as there would be
       labelled images after the batch, so every batch can reach clusters nobody labelled.
    2. Slot by slot, the cluster with the fewest labelled-or-picked members (the largest among
       those) gives its most *typical* unlabelled image: the one with the smallest mean distance to
       its ``neighbours`` nearest neighbours inside the cluster (a dense region's centre, not its
       outlier). A cluster of near-duplicate cine frames is one cluster: it gives one frame until
       every other cluster has given one too. With ``informative`` > 0 the pick inside a cluster
       mixes the typicality rank with the pool rank of ``power``'s combined score by that weight,
       and among equally covered clusters the one whose next frame has the best mix of cluster
       size rank and combined score goes first (a cluster of one or two frames, the usual size
       once tens are labelled, has no inside to choose from). With
       ``informative_ramp`` > 0 that weight grows with the labelled set, ``informative * min(1,
       len(labelled) / informative_ramp)``: typical frames while little is labelled, the model's
       hardest frames of each uncovered cluster once it has seen enough to judge (TypiClust then
       margin: Doucet et al., "Bridging diversity and uncertainty in active learning with
       self-supervised pre-training", 2023, switch the same way, by round).
    3. Every ``1 / fg_share``-th slot is a ``fg_random`` pick, as in ``power``.

    When the pool is ranked whole (``n`` = the pool), the clusters are cycled: each round of the
    cycle takes one image per cluster, least covered first.
    """

    fg_share: float = 0.25
    fg_threshold: float = FG_THRESHOLD
    neighbours: int = 20
    max_new_clusters: int = 32
    informative: float = 0.0
    informative_ramp: int = 0
    centre: bool = True
    name: str = field(default="coverage", init=False)
    uses_labelled: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.fg_share <= 1 or not 0 <= self.informative <= 1:
            raise InvalidInput(f"fg_share and informative must be in [0, 1], got {self.fg_share}, {self.informative}")
        if self.neighbours < 1 or self.max_new_clusters < 1:
            raise InvalidInput("neighbours and max_new_clusters must be >= 1")
        if self.informative_ramp < 0:
            raise InvalidInput(f"informative_ramp must be >= 0, got {self.informative_ramp}")

    def informative_weight(self, labelled: int) -> float:
        """The weight of the combined score inside a cluster when ``labelled`` images are labelled."""
        if self.informative_ramp == 0:
            return self.informative
        return self.informative * min(1.0, labelled / self.informative_ramp)

    def select(
        self, pool: Sequence[Candidate], n: int, rng: np.random.Generator, labelled: Sequence[Candidate] = ()
    ) -> list[int]:
        unique = _unique(pool)
        if n <= 0 or not unique:
            return []
        n = min(n, len(unique))
        pool_ids = {c.image_id for c in unique}
        known = [c for c in _unique(labelled) if c.image_id not in pool_ids]
        weight = self.informative_weight(len(known))
        if {np.asarray(c.embedding).size for c in known} - {np.asarray(unique[0].embedding).size}:
            known = []  # embeddings of another model: cluster the pool alone
        vectors, _ = _normalised([*unique, *known], centre=self.centre)
        k = min(len(known) + min(n, self.max_new_clusters), len(vectors))
        assign = _kmeans(vectors, k, rng)
        members = [np.flatnonzero(assign[: len(unique)] == j) for j in range(k)]
        covered = np.bincount(assign[len(unique) :], minlength=k).astype(np.int64)
        # The combined score's pool rank, in (0, 1]: mixed into the pick inside a cluster and into
        # the choice among equally covered clusters, by ``weight``.
        score = PowerStrategy().combined_score(unique) if weight > 0 else np.zeros(len(unique))
        order = [self._cluster_order(vectors, idx, score, weight) for idx in members]
        sizes = np.array([len(idx) for idx in members]) + covered
        size_rank = _rank01(sizes.astype(np.float64))
        tiebreak = rng.permutation(k)
        foreground = _Cursor(_fg_random_order(unique, self.fg_threshold, rng))
        heads = [0] * k
        taken = np.zeros(len(unique), bool)
        picked: list[int] = []

        def preference(c: int) -> tuple[int, float, int]:
            """Least covered first; among those the largest cluster, or with ``weight`` the mix of its
            size rank and its next frame's combined score."""
            if weight == 0:
                return int(covered[c]), -float(sizes[c]), int(tiebreak[c])
            appeal = (1 - weight) * size_rank[c] + weight * score[order[c][heads[c]]]
            return int(covered[c]), -float(appeal), int(tiebreak[c])

        for slot in range(n):
            index: int | None = None
            if _is_fg_slot(slot, self.fg_share):
                index = foreground.next_untaken(taken)
            if index is None:
                live = [j for j in range(k) if heads[j] < len(order[j])]
                if not live:
                    index = foreground.next_untaken(taken)
                else:
                    j = min(live, key=preference)
                    index = order[j][heads[j]]
            if index is None:  # pragma: no cover - every untaken image is in some cluster's order
                break
            taken[index] = True
            picked.append(index)
            covered[assign[index]] += 1
            for j in range(k):  # an fg pick may come from any cluster: skip taken heads
                while heads[j] < len(order[j]) and taken[order[j][heads[j]]]:
                    heads[j] += 1
        return [unique[i].image_id for i in picked]

    def _cluster_order(
        self, vectors: NDArray[np.float64], idx: NDArray[np.intp], score: NDArray[np.float64], weight: float
    ) -> list[int]:
        """A cluster's unlabelled members, most typical first (ties by position); with ``weight`` > 0
        the typicality rank is mixed with ``score`` (the pool's combined-score ranks) by that weight."""
        if idx.size == 0:
            return []
        key = _rank01(_typicality(vectors[idx], self.neighbours))
        if weight > 0:
            key = (1 - weight) * key + weight * score[idx]
        return [int(idx[i]) for i in np.argsort(-key, kind="stable")]


@dataclass
class DefaultStrategy(CoverageStrategy):
    """The project default: :class:`CoverageStrategy` with its own parameters.

    Why a name of its own rather than a column default of ``coverage``: a project that never chose
    a strategy follows whatever the latest measurement found best, and ``sonoseg al simulate
    --strategies ...,coverage,default --param coverage.X=...`` compares a variant with the default
    in one run. The choices, and the runs behind them, are in docs/decisions.md ("Active learning:
    the default strategy" and "the default gets the informative ramp"). Its parameters are coverage's with the informative ramp on: on a
    validation split of usgra-seg (3 seeds, 7 rounds of 20 from 10 up to 150 labels) coverage with
    ``informative=1, informative_ramp=60`` scored a mean AUBC of 0.462 against random's 0.442 and
    plain coverage's 0.438, at or above random on every seed; plain coverage had tied random
    before (6 seeds, up to 70 labels).
    """

    informative: float = 1.0
    informative_ramp: int = 60
    name: str = field(default="default", init=False)


def _typicality(x: NDArray[np.float64], neighbours: int) -> NDArray[np.float64]:
    """1 / mean Euclidean distance to the ``neighbours`` nearest other points (all equal for 1-2 points)."""
    m = x.shape[0]
    if m <= 2:
        return np.ones(m, np.float64)
    k = min(neighbours, m - 1)
    sq = np.maximum((x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(sq, np.inf)
    nearest = np.sqrt(np.partition(sq, k - 1, axis=1)[:, :k])
    out: NDArray[np.float64] = 1.0 / (nearest.mean(1) + 1e-12)
    return out


def _kmeans(x: NDArray[np.float64], k: int, rng: np.random.Generator, restarts: int = 8) -> NDArray[np.intp]:
    """Cluster labels of ``k``-means, the lowest-inertia of ``restarts`` k-means++ runs (one run lands
    in a poor local optimum now and then even on well-separated clips); every point its own cluster
    when k >= points."""
    if k >= x.shape[0]:
        return np.arange(x.shape[0])
    if k <= 1:
        return np.zeros(x.shape[0], np.intp)
    import warnings

    from scipy.cluster.vq import kmeans2

    best: tuple[float, NDArray[np.intp]] | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "one of the clusters is empty": an empty cluster gives nothing
        for _ in range(restarts):
            centroids, labels = kmeans2(x, k, iter=20, minit="++", rng=rng)
            inertia = float(((x - centroids[labels]) ** 2).sum())
            if best is None or inertia < best[0]:
                best = (inertia, np.asarray(labels, np.intp))
    assert best is not None
    return best[1]


class _Cursor:
    """Walks one ordering, skipping what is taken or too similar to a pick."""

    def __init__(self, order: Sequence[int]) -> None:
        self.order = order
        self.pos = 0

    def next_untaken(self, taken: NDArray[np.bool_]) -> int | None:
        while self.pos < len(self.order):
            index = self.order[self.pos]
            if not taken[index]:
                return index
            self.pos += 1
        return None

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
    vectors, zero = _normalised(pool, centre=centre)
    return _Similarity(vectors, zero)


def _normalised(pool: Sequence[Candidate], *, centre: bool) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Embeddings as rows, optionally minus their mean, L2-normalised; and which vanished (zero rows)."""
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
    return vectors, zero


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

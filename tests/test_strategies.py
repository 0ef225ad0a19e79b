"""Selection strategies (backend.active_learning.strategies): pure numpy, property-tested."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.active_learning.candidates import Candidate, uses_labelled
from backend.active_learning.strategies import STRATEGY_NAMES, DefaultStrategy, PowerStrategy, strategy_named
from backend.errors import InvalidInput

DIM = 8
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def basis(k: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[k % dim] = 1.0
    return v


@st.composite
def candidates(draw: st.DrawFn, *, max_size: int = 30) -> list[Candidate]:
    """A pool with arbitrary scores; ids may repeat (a repeated id counts once)."""
    n = draw(st.integers(0, max_size))
    ids = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    pool = []
    for image_id in ids:
        emb = np.asarray(draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=DIM, max_size=DIM)), np.float32)
        emb = emb / max(float(np.linalg.norm(emb)), 1e-6)
        pool.append(Candidate(image_id, draw(unit), draw(unit), draw(unit), draw(unit), emb.astype(np.float32)))
    return pool


@settings(max_examples=60, deadline=None)
@given(pool=candidates(), n=st.integers(-2, 35), seed=st.integers(0, 2**32 - 1), name=st.sampled_from(STRATEGY_NAMES))
def test_returns_at_most_n_distinct_pool_ids_deterministically(
    pool: list[Candidate], n: int, seed: int, name: str
) -> None:
    strategy = strategy_named(name)
    chosen = strategy.select(pool, n, np.random.default_rng(seed))
    distinct_ids = {c.image_id for c in pool}
    assert len(chosen) == len(set(chosen)) == min(max(n, 0), len(distinct_ids))
    assert set(chosen) <= distinct_ids
    assert strategy.select(pool, n, np.random.default_rng(seed)) == chosen
    assert strategy.name == name


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_an_empty_pool_gives_nothing(name: str) -> None:
    assert strategy_named(name).select([], 5, np.random.default_rng(0)) == []


@settings(max_examples=60, deadline=None)
@given(
    copies=st.lists(st.integers(1, 6), min_size=1, max_size=DIM),
    scores=st.data(),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    centre=st.booleans(),
)
def test_power_never_picks_two_identical_embeddings_while_distinct_ones_remain(
    copies: list[int], scores: st.DataObject, n: int, seed: int, centre: bool
) -> None:
    """Prototype k appears copies[k] times (consecutive cine frames); every pick before the
    distinct prototypes run out is a new prototype."""
    pool = []
    prototype_of = {}
    for k, m in enumerate(copies):
        for _ in range(m):
            image_id = len(pool)
            prototype_of[image_id] = k
            pool.append(
                Candidate(
                    image_id, scores.draw(unit), scores.draw(unit), scores.draw(unit), scores.draw(unit), basis(k)
                )
            )
    chosen = PowerStrategy(centre=centre).select(pool, n, np.random.default_rng(seed))
    k = len(copies)
    head = [prototype_of[i] for i in chosen[:k]]
    assert len(set(head)) == len(head) == min(n, k)
    assert len(chosen) == min(n, len(pool))


def test_power_suppresses_near_duplicates_by_cosine_threshold() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5, 16))
    pool = []
    for i in range(20):  # 5 clips x 4 nearly identical frames; clip 0 is by far the most uncertain
        v = base[i // 4] + 0.01 * rng.normal(size=16)
        pool.append(
            Candidate(i, 1.0 - (i // 4) * 0.2 - i * 1e-3, 0.5, 0.5, 0.5, (v / np.linalg.norm(v)).astype(np.float32))
        )
    chosen = PowerStrategy(beta=20.0, fg_share=0.0).select(pool, 5, np.random.default_rng(0))
    assert sorted(i // 4 for i in chosen) == [0, 1, 2, 3, 4]
    # Entropy top-k takes the whole hardest clip.
    assert sorted(strategy_named("entropy").select(pool, 4, np.random.default_rng(0))) == [0, 1, 2, 3]


def test_power_keeps_its_share_of_foreground_random_slots() -> None:
    """Slots 4 and 8 (fg_share 0.25) come from fg_random even when every informative pick is empty."""
    pool = [Candidate(i, 1.0 - i / 100, 1.0 - i / 100, 1.0 - i / 100, 0.0, basis(i, 64)) for i in range(20)]
    pool += [Candidate(100 + i, 0.01, 0.01, 0.01, 0.2, basis(20 + i, 64)) for i in range(20)]
    chosen = PowerStrategy(beta=50.0).select(pool, 8, np.random.default_rng(3))
    assert [i >= 100 for i in chosen] == [False, False, False, True, False, False, False, True]
    assert chosen[:3] == [0, 1, 2]


def test_fg_random_prefers_frames_with_predicted_foreground_and_tops_up() -> None:
    pool = [Candidate(i, 0.5, 0.5, 0.5, 0.3 if i % 2 else 0.0, basis(i)) for i in range(10)]
    chosen = strategy_named("fg_random").select(pool, 7, np.random.default_rng(0))
    assert all(i % 2 == 1 for i in chosen[:5]) and all(i % 2 == 0 for i in chosen[5:])


def test_entropy_is_top_k_with_ties_by_id() -> None:
    pool = [Candidate(i, e, 0.0, 0.0, 0.1, basis(i)) for i, e in enumerate([0.1, 0.9, 0.5, 0.9, 0.2])]
    assert strategy_named("entropy").select(pool, 3, np.random.default_rng(0)) == [1, 3, 2]


def test_random_differs_between_seeds_and_is_a_permutation() -> None:
    pool = [Candidate(i, 0.0, 0.0, 0.0, 0.0, basis(i)) for i in range(30)]
    a = strategy_named("random").select(pool, 30, np.random.default_rng(0))
    b = strategy_named("random").select(pool, 30, np.random.default_rng(1))
    assert sorted(a) == list(range(30)) and a != b


def test_combined_score_is_rank_based() -> None:
    """Only the order of each score matters: rescaling one changes nothing."""
    rng = np.random.default_rng(0)
    raw = rng.random((3, 12))
    pool = [Candidate(i, *raw[:, i], 0.5, basis(i)) for i in range(12)]
    scaled = [Candidate(i, raw[0, i] ** 3 / 10, *raw[1:, i], 0.5, basis(i)) for i in range(12)]
    s = PowerStrategy()
    np.testing.assert_allclose(s.combined_score(pool), s.combined_score(scaled))
    assert s.combined_score(pool).max() <= 1.0 and s.combined_score(pool).min() > 0.0


def test_unknown_names_and_bad_parameters_are_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown strategy"):
        strategy_named("badge")
    with pytest.raises(InvalidInput):
        strategy_named("power", nonsense=1)
    with pytest.raises(InvalidInput):
        strategy_named("power", fg_share=1.5)
    assert strategy_named("power", beta=2, weights=[1, 0, 1]).select([], 1, np.random.default_rng(0)) == []


def _clustered(
    counts: list[int], rng: np.random.Generator, *, noise: float = 0.01, first_id: int = 0
) -> tuple[list[Candidate], list[int]]:
    """Tight clusters around orthogonal directions (cine clips): candidates and each one's cluster."""
    pool, cluster = [], []
    image_id = first_id
    for j, count in enumerate(counts):
        for _ in range(count):
            emb = basis(j, dim=max(DIM, len(counts))) + noise * rng.standard_normal(max(DIM, len(counts)))
            pool.append(Candidate(image_id, 0.5, 0.5, 0.5, 0.5, emb.astype(np.float32)))
            cluster.append(j)
            image_id += 1
    return pool, cluster


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(2, 6), min_size=2, max_size=10),
    covered_share=st.floats(0.0, 0.7),
    seed=st.integers(0, 2**32 - 1),
)
def test_coverage_takes_one_image_from_every_cluster_no_labelled_image_covers(
    counts: list[int], covered_share: float, seed: int
) -> None:
    """Labelled images cover some clips; a batch the size of the uncovered clips takes exactly one
    frame of each uncovered clip and none of a covered one."""
    rng = np.random.default_rng(seed)
    everything, cluster = _clustered(counts, rng)
    covered = set(rng.permutation(len(counts))[: int(covered_share * len(counts))].tolist())
    labelled, pool = [], []
    for c, j in zip(everything, cluster, strict=True):
        first_of_cluster = c.image_id == next(x.image_id for x, y in zip(everything, cluster, strict=True) if y == j)
        (labelled if j in covered and first_of_cluster else pool).append(c)
    uncovered = len(counts) - len(covered)
    if uncovered == 0:
        return
    strategy = strategy_named("coverage", fg_share=0.0)
    chosen = strategy.select(pool, uncovered, np.random.default_rng(seed), labelled)
    of = {c.image_id: j for c, j in zip(everything, cluster, strict=True)}
    assert sorted(of[i] for i in chosen) == sorted(set(range(len(counts))) - covered)


def test_coverage_picks_a_clusters_typical_frame_not_its_outlier() -> None:
    rng = np.random.default_rng(0)
    pool, _ = _clustered([8], rng, noise=0.01)
    outlier = Candidate(99, 0.9, 0.9, 0.9, 0.5, (basis(0) + 0.3 * basis(1)).astype(np.float32))
    other, _ = _clustered([0, 5], rng, first_id=50)  # a second clip far away
    chosen = strategy_named("coverage", fg_share=0.0).select([outlier, *pool, *other], 2, np.random.default_rng(1))
    assert 99 not in chosen and len(chosen) == 2
    assert {i >= 50 for i in chosen} == {True, False}  # one per clip


def test_coverage_ranking_the_whole_pool_cycles_through_the_clusters() -> None:
    rng = np.random.default_rng(3)
    pool, cluster = _clustered([6, 4, 5], rng)
    of = {c.image_id: j for c, j in zip(pool, cluster, strict=True)}
    ranked = strategy_named("coverage", fg_share=0.0, max_new_clusters=3).select(pool, len(pool), rng)
    assert sorted(ranked) == sorted(of)
    assert len({of[i] for i in ranked[:3]}) == 3 and len({of[i] for i in ranked[3:6]}) == 3


def test_coverage_keeps_its_foreground_random_share_and_ignores_foreign_embeddings() -> None:
    rng = np.random.default_rng(5)
    pool, _ = _clustered([5, 5, 5, 5], rng)
    pool = [
        Candidate(
            c.image_id,
            c.entropy,
            c.tta_disagreement,
            c.boundary_uncertainty,
            0.5 if c.image_id < 5 else 0.0,
            c.embedding,
        )
        for c in pool
    ]
    foreign = [Candidate(1000, 0.5, 0.5, 0.5, 0.5, np.ones(3, np.float32))]  # another model's embedding size
    chosen = strategy_named("coverage", fg_share=0.5).select(pool, 4, np.random.default_rng(0), foreign)
    assert len(chosen) == 4 and 1000 not in chosen
    assert all(chosen[slot] < 5 for slot in (1, 3))  # the fg slots: frames with predicted foreground


@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.integers(1, 5), min_size=1, max_size=6), n=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_default_is_coverage_under_its_own_name(counts: list[int], n: int, seed: int) -> None:
    """The project default is the tuned winner (coverage with the informative ramp): same picks for
    the same random state, it reads the labelled images too (so coverage projects' labelled frames
    are scored), and its parameters are coverage's."""
    pool, _ = _clustered(counts, np.random.default_rng(seed))
    labelled, rest = pool[:1], pool[1:]
    default = strategy_named("default")
    assert isinstance(default, DefaultStrategy) and default.name == "default" and uses_labelled(default)
    assert (default.informative, default.informative_ramp) == (1.0, 60)
    tuned = strategy_named("coverage", informative=1.0, informative_ramp=60)
    assert default.select(rest, n, np.random.default_rng(seed), labelled) == tuned.select(
        rest, n, np.random.default_rng(seed), labelled
    )
    assert strategy_named("default", informative=0.0).informative_weight(100) == 0.0
    with pytest.raises(InvalidInput):
        strategy_named("default", beta=2)  # power's parameter, not the default's


def test_the_informative_weight_ramps_with_the_labelled_count_and_a_negative_ramp_is_refused() -> None:
    flat = strategy_named("coverage", informative=0.6)
    assert [flat.informative_weight(n) for n in (0, 5, 500)] == [0.6, 0.6, 0.6]
    ramp = strategy_named("coverage", informative=0.8, informative_ramp=40)
    weights = [ramp.informative_weight(n) for n in range(0, 100, 5)]
    assert weights[0] == 0.0 and weights[-1] == pytest.approx(0.8)
    assert all(a <= b for a, b in itertools.pairwise(weights))
    assert ramp.informative_weight(20) == pytest.approx(0.4)
    with pytest.raises(InvalidInput, match="informative_ramp"):
        strategy_named("coverage", informative_ramp=-1)


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    n=st.integers(1, 12),
    ramp=st.integers(1, 200),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_ramp_with_nothing_labelled_picks_as_plain_coverage(counts: list[int], n: int, ramp: int, seed: int) -> None:
    """With no labelled image the ramped weight is 0: the picks are plain coverage's, whatever the scores."""
    rng = np.random.default_rng(seed)
    pool, _ = _clustered(counts, rng)
    pool = [Candidate(c.image_id, *rng.random(4).tolist(), c.embedding) for c in pool]
    ramped = strategy_named("coverage", informative=1.0, informative_ramp=ramp)
    assert ramped.select(pool, n, np.random.default_rng(seed)) == strategy_named("coverage").select(
        pool, n, np.random.default_rng(seed)
    )


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(1, 4), min_size=3, max_size=8), seed=st.integers(0, 2**32 - 1))
def test_full_informative_weight_takes_the_most_informative_frame_of_the_uncovered_clusters(
    counts: list[int], seed: int
) -> None:
    """At weight 1 the first pick is the frame with the best combined score among all uncovered
    clusters (each cluster's head is its most informative frame, and clusters are equally uncovered)."""
    rng = np.random.default_rng(seed)
    pool, _ = _clustered(counts, rng)
    pool = [Candidate(c.image_id, *rng.random(3).tolist(), 0.5, c.embedding) for c in pool]
    strategy = strategy_named("coverage", fg_share=0.0, informative=1.0, max_new_clusters=len(counts))
    first = strategy.select(pool, 1, np.random.default_rng(seed))
    score = PowerStrategy().combined_score(pool)
    ids = [c.image_id for c in pool]
    assert len(first) == 1 and score[ids.index(first[0])] == score.max()

"""The work list: which images each sonographer labels next, handed out under leases.

Core functions: each takes the caller's session and never commits; the caller's unit of work is
the atomic step (``sonoseg next``, ``GET /api/next``).

:func:`lease_next` ranks the project's pool (:mod:`backend.services.scores`) with the project's
strategy and leases the top images to one annotator until ``now + ttl``:

- an annotator asking again gets their own live leases back first (renewed to the new expiry),
  then new images;
- an image under another annotator's live lease is never offered; an expired lease is free and is
  taken over;
- a submitted annotation ends the image's lease (:func:`release_for_image`, called by
  :func:`backend.services.annotations.apply_annotation`).

**Atomicity.** The unique ``label_lease.image_id`` is the guarantee: a claim is either a
compare-and-set ``UPDATE ... WHERE image_id = :id AND expires_at <= :now`` (taking over an expired
lease) or an ``INSERT`` inside a SAVEPOINT; the loser of a race gets zero rows or an integrity error
and moves on to the next candidate, so two requests never lease the same image. On top of that,
requests for one project are serialised so that they do not waste each other's work or deadlock on
each other's uncommitted inserts: on PostgreSQL by a transaction-scoped advisory lock per project
(held until the caller's commit; it does not conflict with any row lock), on SQLite by the
``BEGIN IMMEDIATE`` every sonoseg transaction starts with.

**Ranking.** Candidates are the pool images the serving model scored (:func:`~backend.services.scores.
candidates_for`), ranked by the strategy; when fewer than ``n`` are free, pool images without scores
(no model serves yet, or frames that arrived after the last scoring) follow in random order, so
nothing is starved before the first model.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from sqlalchemy import CursorResult, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.active_learning.candidates import Candidate, Strategy, uses_labelled
from backend.active_learning.strategies import strategy_named
from backend.db.base import utcnow
from backend.db.models import ImageSource, LabelLease, Project
from backend.errors import InvalidInput
from backend.services.scores import candidates_for, labelled_candidates, pool_image_ids
from backend.services.versions import serving_version

MAX_BATCH = 100
MAX_ANNOTATOR_CHARS = 200
DEFAULT_TTL_SECONDS = 1800.0
MAX_TTL_SECONDS = 7 * 24 * 3600.0
_ADVISORY_NAMESPACE = 0x534E58  # "SNX": the first key of pg_advisory_xact_lock(namespace, project id)


@dataclass(frozen=True)
class Lease:
    """One image handed out: to whom, until when, and its place in the answer (1 = label first).

    ``ls_task_id``: a Label Studio task showing the image (its lowest active one), when there is one.
    """

    image_id: int
    annotator: str
    expires_at: dt.datetime
    rank: int
    ls_task_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "image_id": self.image_id,
            "ls_task_id": self.ls_task_id,
            "annotator": self.annotator,
            "expires_at": self.expires_at.isoformat(),
        }


@dataclass(frozen=True)
class WorkList:
    """What ``sonoseg next`` and ``GET /api/next`` answer: the leases and what ranked them."""

    project_id: int
    project: str
    annotator: str
    strategy: str
    model_version: str | None  # the serving version whose scores ranked the pool (None: no model yet)
    leases: tuple[Lease, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "project_id": self.project_id,
            "project": self.project,
            "annotator": self.annotator,
            "strategy": self.strategy,
            "model_version": self.model_version,
            "leases": [lease.to_json() for lease in self.leases],
        }


# -- input checks (the CLI and the HTTP view share them) ------------------------------------------------
def check_annotator(annotator: str | None) -> str:
    name = (annotator or "").strip()
    if not name:
        raise InvalidInput("an annotator is required (who the images are leased to, e.g. --annotator alice)")
    if len(name) > MAX_ANNOTATOR_CHARS:
        raise InvalidInput(f"the annotator name is {len(name)} characters long; at most {MAX_ANNOTATOR_CHARS}")
    if not name.isprintable():
        raise InvalidInput("the annotator name holds control characters")
    return name


def check_batch(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BATCH:
        raise InvalidInput(f"n must be a whole number from 1 to {MAX_BATCH}, got {n!r}")
    return n


def check_ttl(ttl_seconds: float) -> float:
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float)):
        raise InvalidInput(f"the lease time must be a number of seconds, got {ttl_seconds!r}")
    ttl = float(ttl_seconds)
    if not math.isfinite(ttl) or not 1.0 <= ttl <= MAX_TTL_SECONDS:
        raise InvalidInput(f"the lease time must be from 1 to {MAX_TTL_SECONDS:.0f} seconds, got {ttl_seconds!r}")
    return ttl


def set_strategy(session: Session, project: Project, name: str) -> str:
    """Make ``name`` the project's strategy (refused when no such strategy exists)."""
    strategy_named(name)  # InvalidInput for an unknown name
    project.al_strategy = name
    session.flush()
    return name


# -- leases ---------------------------------------------------------------------------------------------
def lease_next(
    session: Session,
    project: Project,
    annotator: str,
    n: int,
    ttl_seconds: float,
    strategy: Strategy,
    rng: np.random.Generator,
    now: dt.datetime,
) -> list[Lease]:
    """Lease up to ``n`` images of ``project``'s pool to ``annotator`` until ``now + ttl_seconds``.

    Returns the leases best first: the annotator's own live leases (renewed), then new ones in the
    strategy's order, then unscored pool images. Fewer than ``n`` when the pool runs out.
    """
    annotator = check_annotator(annotator)
    n = check_batch(n)
    ttl = check_ttl(ttl_seconds)
    if now.tzinfo is None:
        raise InvalidInput("now must be a timezone-aware datetime")
    expires = now + dt.timedelta(seconds=ttl)
    _serialise(session, project.id)

    pool = set(pool_image_ids(session, project))
    chosen: list[int] = []
    own = session.scalars(
        select(LabelLease)
        .where(LabelLease.project_id == project.id, LabelLease.annotator == annotator, LabelLease.expires_at > now)
        .order_by(LabelLease.leased_at, LabelLease.id)
    ).all()
    for lease in own:
        if lease.image_id not in pool:  # labelled (an import), moved out of train, or retired meanwhile
            session.delete(lease)
        elif len(chosen) < n:
            lease.expires_at = max(lease.expires_at, expires)
            chosen.append(lease.image_id)
    session.flush()

    if len(chosen) < n:
        live = set(
            session.scalars(
                select(LabelLease.image_id).where(LabelLease.project_id == project.id, LabelLease.expires_at > now)
            )
        )
        free = pool - live
        serving = serving_version(session, project.id)
        every = candidates_for(session, project, serving.id) if serving else []
        scored = [c for c in every if c.image_id in free]
        known: list[Candidate] = []
        if serving is not None and uses_labelled(strategy):
            # Covered: what is labelled, and what other sonographers hold leases on (labelled soon).
            known = labelled_candidates(session, project, serving.id) + [c for c in every if c.image_id in live]
        chosen += _claim_ranked(
            session, project.id, annotator, scored, n - len(chosen), strategy, rng, now, expires, known
        )
        if len(chosen) < n:
            unscored = sorted(free - {c.image_id for c in scored})
            for index in rng.permutation(len(unscored)):
                if len(chosen) == n:
                    break
                image_id = unscored[int(index)]
                if _claim(session, project.id, image_id, annotator, now, expires):
                    chosen.append(image_id)
    tasks = _task_ids(session, chosen)
    expiry = dict(
        session.execute(select(LabelLease.image_id, LabelLease.expires_at).where(LabelLease.image_id.in_(chosen))).all()
    )
    return [
        Lease(image_id, annotator, expiry.get(image_id, expires), rank, tasks.get(image_id))
        for rank, image_id in enumerate(chosen, start=1)
    ]


def hand_out(
    session: Session,
    project: Project,
    annotator: str,
    n: int,
    *,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    strategy: str | None = None,
    rng: np.random.Generator | None = None,
    now: dt.datetime | None = None,
) -> WorkList:
    """:func:`lease_next` with the project's strategy (or ``strategy``), a fresh random generator and
    the current time: what the CLI and the HTTP view call."""
    name = strategy or project.al_strategy
    leases = lease_next(
        session,
        project,
        annotator,
        n,
        ttl_seconds,
        strategy_named(name),
        rng if rng is not None else np.random.default_rng(),
        now if now is not None else utcnow(),
    )
    serving = serving_version(session, project.id)
    return WorkList(
        project.id,
        project.name,
        check_annotator(annotator),
        name,
        serving.uid if serving is not None else None,
        tuple(leases),
    )


def release_for_image(session: Session, image_id: int) -> bool:
    """End the image's lease, whoever holds it (an annotation of it was submitted). True if there was one."""
    result = cast(CursorResult[Any], session.execute(delete(LabelLease).where(LabelLease.image_id == image_id)))
    return bool(result.rowcount)


def live_leases(session: Session, project: Project, now: dt.datetime) -> list[Lease]:
    """Every live lease of the project, oldest first (rank: position in that order)."""
    rows = session.execute(
        select(LabelLease.image_id, LabelLease.annotator, LabelLease.expires_at)
        .where(LabelLease.project_id == project.id, LabelLease.expires_at > now)
        .order_by(LabelLease.leased_at, LabelLease.id)
    ).all()
    tasks = _task_ids(session, [int(r[0]) for r in rows])
    return [Lease(int(r[0]), str(r[1]), r[2], rank, tasks.get(int(r[0]))) for rank, r in enumerate(rows, start=1)]


# -- claiming -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankedPool:
    """The whole pool of a project in the order its strategy would hand it out (no leases taken):
    what Label Studio's own stream is told to follow (:mod:`backend.services.ls_ranking`)."""

    project_id: int
    ls_project_id: int | None
    strategy: str
    model_version: str | None
    image_ids: tuple[int, ...]  # best first
    ls_task_ids: tuple[int | None, ...]  # the Label Studio task of each image, when it has one
    scored: Mapping[int, Candidate] = field(default_factory=dict)  # image id -> its cached scores

    def ranked_task_ids(self) -> list[int]:
        return [t for t in self.ls_task_ids if t is not None]


def rank_pool(
    session: Session, project: Project, *, strategy: str | None = None, rng: np.random.Generator | None = None
) -> RankedPool:
    """Rank every pool image: scored ones by the strategy (asked for the whole pool at once, so a
    batch strategy's diversity spreads over the ranking's head), then unscored ones in random order."""
    name = strategy or project.al_strategy
    chooser = strategy_named(name)
    rng = rng if rng is not None else np.random.default_rng()
    pool = pool_image_ids(session, project)
    serving = serving_version(session, project.id)
    scored = candidates_for(session, project, serving.id) if serving else []
    known = labelled_candidates(session, project, serving.id) if serving and uses_labelled(chooser) else []
    ranked = [i for i in dict.fromkeys(chooser.select(scored, len(scored), rng, known)) if i in set(pool)]
    rest = sorted(set(pool) - set(ranked))
    ranked += [rest[int(i)] for i in rng.permutation(len(rest))]
    tasks = _task_ids(session, ranked)
    return RankedPool(
        project.id,
        project.ls_project_id,
        name,
        serving.uid if serving is not None else None,
        tuple(ranked),
        tuple(tasks.get(i) for i in ranked),
        {c.image_id: c for c in scored},
    )


def _serialise(session: Session, project_id: int) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_ADVISORY_NAMESPACE, project_id)))


def _claim_ranked(
    session: Session,
    project_id: int,
    annotator: str,
    pool: Sequence[Candidate],
    need: int,
    strategy: Strategy,
    rng: np.random.Generator,
    now: dt.datetime,
    expires: dt.datetime,
    known: Sequence[Candidate] = (),
) -> list[int]:
    """Ask the strategy for ``need`` images, claim them in its order; a lost claim leaves the pool and the
    strategy is asked again for what is still missing, until enough are claimed or the pool is empty."""
    claimed: list[int] = []
    remaining = list(pool)
    while len(claimed) < need and remaining:
        ids = {c.image_id for c in remaining}
        picks = [i for i in dict.fromkeys(strategy.select(remaining, need - len(claimed), rng, known)) if i in ids]
        if not picks:
            break
        for image_id in picks[: need - len(claimed)]:
            if _claim(session, project_id, image_id, annotator, now, expires):
                claimed.append(image_id)
        tried = set(picks)
        remaining = [c for c in remaining if c.image_id not in tried]
    return claimed


def _claim(
    session: Session, project_id: int, image_id: int, annotator: str, now: dt.datetime, expires: dt.datetime
) -> bool:
    """Lease one image, or report that someone else holds it: never both for two callers.

    Takes over an expired lease by compare-and-set, else inserts a new one inside a SAVEPOINT (the
    unique image id refuses a second live lease; the savepoint keeps the caller's transaction usable).
    """
    values = {"project_id": project_id, "annotator": annotator, "leased_at": now, "expires_at": expires}
    taken_over = cast(
        CursorResult[Any],
        session.execute(
            update(LabelLease)
            .where(LabelLease.image_id == image_id, LabelLease.expires_at <= now)
            .values(**values)
            .execution_options(synchronize_session=False)
        ),
    )
    if taken_over.rowcount:
        return True
    try:
        with session.begin_nested():
            session.execute(insert(LabelLease).values(image_id=image_id, **values))
    except IntegrityError:
        return False
    return True


def _task_ids(session: Session, image_ids: Sequence[int]) -> dict[int, int]:
    if not image_ids:
        return {}
    rows = session.execute(
        select(ImageSource.image_id, func.min(ImageSource.ls_task_id))
        .where(ImageSource.image_id.in_(list(image_ids)), ImageSource.active, ImageSource.ls_task_id.is_not(None))
        .group_by(ImageSource.image_id)
    ).all()
    return {int(r[0]): int(r[1]) for r in rows if r[1] is not None}

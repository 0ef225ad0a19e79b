"""Cached acquisition scores, per model version, and the pool active learning ranks.

Core functions: each takes the caller's session and never commits. The scores are computed by the
serving model (:func:`backend.model.scores.score_images`) in the re-prediction workflow after a
promotion (:mod:`backend.services.repredict`), which stores them here; the work list
(:mod:`backend.services.worklist`) reads them back as
:class:`~backend.active_learning.candidates.Candidate` values.

**The pool** is what a sonographer may be asked to label: images of the project

- in the ``train`` split (:data:`POOL_SPLITS`): validation and test images are never chosen by the
  model they measure (a model picking its own hardest validation frames would bias the gate and
  the held-out scores); they are labelled through Label Studio's own order or imported;
- without a current label (no current ``annotation``/``import`` mask version; predictions are
  never current);
- without an open label issue (a refused annotation or a conflicting duplicate waits for a
  curator, not for another sonographer);
- not retired: an image whose every source is inactive (its Label Studio tasks were deleted) is
  gone from the pool; an image with no source row at all (made directly, as in tests) stays.

**Context images**: a strategy that reads what is already labelled (``uses_labelled``: ``coverage``)
also needs the serving model's scores of the project's labelled ``train`` images
(:func:`labelled_in_train`); for projects with such a strategy they are scored with the pool
(:func:`scoring_scope`).

Embeddings are stored as little-endian float16 (2 bytes per value, ``embedding_dim`` values) and
come back as float32 re-normalised to unit length (float16 rounding moves the norm by ~1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import ColumnElement, and_, exists, not_, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import InstrumentedAttribute, Session

from backend.active_learning.candidates import Candidate, uses_labelled
from backend.active_learning.strategies import STRATEGY_NAMES, strategy_named
from backend.db.base import utcnow
from backend.db.models import Image, ImageScore, ImageSource, LabelIssue, MaskVersion, ModelVersion, Project
from backend.errors import InvalidInput, NotFound
from backend.model.scores import ImageScores

POOL_SPLITS = ("train",)
EMBEDDING_DTYPE = np.dtype("<f2")
_UPSERT_CHUNK = 500  # rows per INSERT statement (well under SQLite's bound-parameter limit)
_SCORE_FIELDS = ("entropy", "tta_disagreement", "boundary_uncertainty", "foreground_fraction")


@dataclass(frozen=True)
class PoolImage:
    """An image of the pool, as the scoring workflow needs it: where its pixels are."""

    image_id: int
    blob_key: str


# -- embeddings --------------------------------------------------------------------------------------
def encode_embedding(embedding: NDArray[Any]) -> tuple[bytes, int]:
    """A 1-D vector -> (little-endian float16 bytes, length)."""
    vector = np.asarray(embedding)
    if vector.ndim != 1:
        raise InvalidInput(f"an embedding must be a 1-D vector, got shape {vector.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # out of float16's range becomes inf: refused below
        half = vector.astype(EMBEDDING_DTYPE)
    if not np.isfinite(half).all():
        raise InvalidInput("an embedding holds NaN or infinite values (or values beyond float16's range)")
    return half.tobytes(), int(half.shape[0])


def decode_embedding(blob: bytes, dim: int) -> NDArray[np.float32]:
    """Stored bytes -> a float32 vector of unit length (a zero vector stays zero)."""
    if len(blob) != dim * EMBEDDING_DTYPE.itemsize:
        raise InvalidInput(f"a stored embedding has {len(blob)} bytes, not {dim} float16 values")
    vector = np.frombuffer(blob, dtype=EMBEDDING_DTYPE).astype(np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


# -- writing -----------------------------------------------------------------------------------------
def _row(model_version_id: int, image_id: int, scores: ImageScores) -> dict[str, Any]:
    values = {name: float(getattr(scores, name)) for name in _SCORE_FIELDS}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise InvalidInput(f"image {image_id}: score(s) {', '.join(bad)} are not finite numbers")
    blob, dim = encode_embedding(scores.embedding)
    return {
        "image_id": image_id,
        "model_version_id": model_version_id,
        **values,
        "embedding": blob,
        "embedding_dim": dim,
        "created_at": utcnow(),
    }


def store_scores(session: Session, model_version_id: int, scores: Mapping[int, ImageScores]) -> int:
    """Store (or replace) ``model_version_id``'s scores of these images; returns the rows written.

    Idempotent: one row per (image, version), replaced in place by an upsert (``INSERT ... ON
    CONFLICT DO UPDATE`` on SQLite and PostgreSQL), so two workers storing the same version's
    scores at once never fail. Every image must belong to the version's project.
    """
    if not scores:
        return 0
    version = session.get(ModelVersion, model_version_id)
    if version is None:
        raise NotFound(f"no model version {model_version_id}")
    ids = sorted(scores)
    known = set(session.scalars(select(Image.id).where(Image.id.in_(ids), Image.project_id == version.project_id)))
    foreign = [i for i in ids if i not in known]
    if foreign:
        raise InvalidInput(
            f"image(s) {foreign[:10]} are not images of project {version.project_id} (model version {version.uid})"
        )
    rows = [_row(model_version_id, image_id, scores[image_id]) for image_id in ids]
    dialect = session.get_bind().dialect.name
    for start in range(0, len(rows), _UPSERT_CHUNK):
        chunk = rows[start : start + _UPSERT_CHUNK]
        if dialect == "postgresql":
            pg = pg_insert(ImageScore).values(chunk)
            session.execute(
                pg.on_conflict_do_update(index_elements=["image_id", "model_version_id"], set_=_updates(pg.excluded))
            )
        elif dialect == "sqlite":
            lite = sqlite_insert(ImageScore).values(chunk)
            session.execute(
                lite.on_conflict_do_update(
                    index_elements=["image_id", "model_version_id"], set_=_updates(lite.excluded)
                )
            )
        else:  # pragma: no cover - sonoseg runs on SQLite and PostgreSQL only
            raise InvalidInput(f"scores cannot be stored on a {dialect} database")
    session.flush()
    return len(rows)


def _updates(excluded: Any) -> dict[str, Any]:
    names = (*_SCORE_FIELDS, "embedding", "embedding_dim", "created_at")
    return {name: getattr(excluded, name) for name in names}


# -- the pool ----------------------------------------------------------------------------------------
def in_pool(project_id: int | ColumnElement[int] | InstrumentedAttribute[int]) -> ColumnElement[bool]:
    """The pool's rule (module doc) as a WHERE clause on :class:`Image`."""
    labelled = exists().where(MaskVersion.image_id == Image.id, MaskVersion.is_current)
    held_back = exists().where(LabelIssue.image_id == Image.id, LabelIssue.status == "open")
    any_source = exists().where(ImageSource.image_id == Image.id)
    active_source = exists().where(ImageSource.image_id == Image.id, ImageSource.active)
    return and_(
        Image.project_id == project_id,
        Image.split.in_(POOL_SPLITS),
        not_(labelled),
        not_(held_back),
        or_(not_(any_source), active_source),
    )


def pool_image_ids(session: Session, project: Project) -> list[int]:
    """The ids of the project's pool (module doc), ascending."""
    return list(session.scalars(select(Image.id).where(in_pool(project.id)).order_by(Image.id)))


def labelled_in_train(project_id: int | ColumnElement[int] | InstrumentedAttribute[int]) -> ColumnElement[bool]:
    """The project's ``train`` images with a current label: what a ``coverage`` ranking counts as covered."""
    labelled = exists().where(MaskVersion.image_id == Image.id, MaskVersion.is_current)
    return and_(Image.project_id == project_id, Image.split.in_(POOL_SPLITS), labelled)


# Strategies that read the labelled images' scores (their projects score those too).
CONTEXT_STRATEGIES = tuple(name for name in STRATEGY_NAMES if uses_labelled(strategy_named(name)))


def scoring_scope(project: Project) -> ColumnElement[bool]:
    """The images whose scores ``project``'s strategy reads: the pool, plus the labelled ``train``
    images when the strategy reads what is covered."""
    if project.al_strategy in CONTEXT_STRATEGIES:
        return or_(in_pool(project.id), labelled_in_train(project.id))
    return in_pool(project.id)


def projects_awaiting_scores(session: Session) -> list[int]:
    """Projects whose serving version has not scored some image of their scoring scope yet (frames that
    arrived since the last promotion): what the periodic scoring tick hands to the ``predict`` queue.
    One statement."""
    scored = exists().where(ImageScore.image_id == Image.id, ImageScore.model_version_id == ModelVersion.id)
    reads_labelled = exists().where(Project.id == ModelVersion.project_id, Project.al_strategy.in_(CONTEXT_STRATEGIES))
    scope = or_(in_pool(ModelVersion.project_id), and_(reads_labelled, labelled_in_train(ModelVersion.project_id)))
    waiting = exists().where(scope, not_(scored))
    query = select(ModelVersion.project_id).where(ModelVersion.status == "serving", waiting).distinct()
    return sorted(int(pid) for pid in session.scalars(query))


def unscored_images(session: Session, project: Project, model_version_id: int) -> list[PoolImage]:
    """Images of the project's scoring scope (:func:`scoring_scope`) that ``model_version_id`` has not
    scored yet, ascending by id."""
    scored = exists().where(ImageScore.image_id == Image.id, ImageScore.model_version_id == model_version_id)
    rows = session.execute(
        select(Image.id, Image.blob_key).where(scoring_scope(project), not_(scored)).order_by(Image.id)
    ).all()
    return [PoolImage(int(r[0]), str(r[1])) for r in rows]


def candidates_for(session: Session, project: Project, model_version_id: int) -> list[Candidate]:
    """The pool images that ``model_version_id`` scored, as candidates (its scores only), by image id."""
    return _candidates(session, model_version_id, in_pool(project.id))


def labelled_candidates(session: Session, project: Project, model_version_id: int) -> list[Candidate]:
    """The labelled ``train`` images that ``model_version_id`` scored (what a ``coverage`` ranking
    counts as covered), by image id."""
    return _candidates(session, model_version_id, labelled_in_train(project.id))


def _candidates(session: Session, model_version_id: int, where: ColumnElement[bool]) -> list[Candidate]:
    rows = session.execute(
        select(
            Image.id,
            Image.subject,
            ImageScore.entropy,
            ImageScore.tta_disagreement,
            ImageScore.boundary_uncertainty,
            ImageScore.foreground_fraction,
            ImageScore.embedding,
            ImageScore.embedding_dim,
        )
        .join(ImageScore, ImageScore.image_id == Image.id)
        .where(ImageScore.model_version_id == model_version_id, where)
        .order_by(Image.id)
    ).all()
    return [
        Candidate(
            image_id=int(r[0]),
            entropy=float(r[2]),
            tta_disagreement=float(r[3]),
            boundary_uncertainty=float(r[4]),
            foreground_fraction=float(r[5]),
            embedding=decode_embedding(bytes(r[6]), int(r[7])),
            subject=r[1],
        )
        for r in rows
    ]

"""Train / val / test by subject, so one subject's frames never straddle splits.

Two layers:

- **Automatic assignment** (pure): :func:`assign_split` is a deterministic hash of (project salt,
  subject pseudonym), so it is stable as the dataset grows: adding subjects never moves an
  existing subject to another split, and a model's held-out images stay held out. Once a
  project's test split is *frozen*, the hash gives train or val only (the train and val
  fractions re-normalised), so no new subject ever enters test by chance.
- **Curators' decisions** (take a session, never commit): :func:`split_for_new_image` (the split a
  new frame gets: the one its subject already has, else the curator's, else the hash),
  :func:`freeze_test`, :func:`move_subject` and :func:`split_log`, recorded in ``split_change``.

The frozen test split: a project's ``test_frozen`` flag is set by ``sonoseg split freeze``, or the
first time a curator puts images into test (``sonoseg import --split test``, a splits CSV,
``sonoseg split move --to test``). From then on automatic assignment never puts a new subject
into test, and :func:`move_subject` refuses to move a subject into or out of test unless forced.
A new frame of a subject that is already in test joins it: putting it in train or val would
leak that subject into training, which matters more than the test split's size.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import SPLIT_VALUES, Image, Project, SplitChange
from backend.errors import Conflict, InvalidInput, NotFound


@dataclass(frozen=True)
class SplitFractions:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        parts = (self.train, self.val, self.test)
        if any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
            raise InvalidInput(f"split fractions must be >= 0 and sum to 1, got {parts}")

    def without_test(self) -> SplitFractions:
        """Train and val re-normalised to sum to 1 (a frozen test split takes no new subjects)."""
        rest = self.train + self.val
        if rest <= 0:
            raise InvalidInput("the test split is frozen and the train and val fractions are both 0")
        return SplitFractions(self.train / rest, 1.0 - self.train / rest, 0.0)


def assign_split(
    subject: str, salt: str = "", fractions: SplitFractions = SplitFractions(), *, test_frozen: bool = False
) -> str:
    """The split for ``subject``: 'train', 'val' or 'test' ('train' or 'val' when ``test_frozen``)."""
    if test_frozen:
        fractions = fractions.without_test()
    digest = hashlib.sha256(f"{salt}\x00{subject}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.val or fractions.test == 0:
        return "val"
    return "test"


def check_split(value: str) -> str:
    """``value`` as a split name (case and surrounding blanks ignored), else :class:`InvalidInput`."""
    split = value.strip().lower()
    if split not in SPLIT_VALUES:
        raise InvalidInput(f"unknown split {value!r}; expected one of {', '.join(SPLIT_VALUES)}")
    return split


# -- curators' decisions (a session from the caller; nothing is committed here) --------------------


_SUBJECT_SPLIT = (
    select(Image.split)
    .where(Image.project_id == bindparam("project_id"), Image.subject == bindparam("subject"))
    .limit(1)
)  # built once: asked for every new frame


def subject_split(session: Session, project_id: int, subject: str) -> str | None:
    """The split the subject's frames are in (None: a new subject)."""
    return session.scalars(_SUBJECT_SPLIT, {"project_id": project_id, "subject": subject}).first()


def split_for_new_image(session: Session, project: Project, subject: str, requested: str | None = None) -> str:
    """The split of a new frame of ``subject``: its subject's split, else ``requested``, else the hash.

    A curator's ``requested`` split that differs from the split the subject already has is refused
    (:class:`Conflict`): it would put one subject on both sides; `sonoseg split move` moves it.
    """
    current = subject_split(session, project.id, subject)
    if requested is not None:
        requested = check_split(requested)
        if current is not None and current != requested:
            raise Conflict(
                f"subject {subject} is already in {current}; importing this file into {requested} would split "
                f"the subject across {current} and {requested} (move the subject first: "
                f"`sonoseg split move --project {project.name} --subject {subject} --to {requested}`)"
            )
        return requested
    if current is not None:
        return current
    return assign_split(subject, salt=str(project.id), test_frozen=project.test_frozen)


def freeze_test(session: Session, project: Project, *, author: str, reason: str | None = None) -> bool:
    """Freeze the project's test split (recorded); False when it already was."""
    if project.test_frozen:
        return False
    project.test_frozen = True
    session.add(SplitChange(project_id=project.id, kind="freeze", author=author, reason=reason))
    session.flush()
    return True


@dataclass(frozen=True)
class SplitMove:
    """What :func:`move_subject` did: ``moved`` is (from split, frames) per split the frames left."""

    subject: str
    image_id: int | None
    to_split: str
    moved: tuple[tuple[str, int], ...]
    forced: bool
    froze_test: bool

    @property
    def images(self) -> int:
        return sum(n for _, n in self.moved)


def move_subject(
    session: Session,
    project: Project,
    *,
    to: str,
    author: str,
    subject: str | None = None,
    image_id: int | None = None,
    force: bool = False,
    reason: str | None = None,
) -> SplitMove:
    """Move every frame of a subject (given directly, or as the subject of ``image_id``) to ``to``.

    A whole subject always moves: moving one frame would put the subject on both sides. With the
    project's test split frozen, moving into or out of test needs ``force``; moving into test
    otherwise freezes it (a curator set test images). Each split the frames left is one
    ``split_change`` row. Moving a subject that is already entirely in ``to`` changes nothing.
    """
    to = check_split(to)
    if (subject is None) == (image_id is None):
        raise InvalidInput("name either a subject or an image to move")
    if image_id is not None:
        image = session.get(Image, image_id)
        if image is None or image.project_id != project.id:
            raise NotFound(f"no image {image_id} in project {project.name!r}")
        subject = image.subject
    assert subject is not None
    counts: dict[str, int] = {
        split: n
        for split, n in session.execute(
            select(Image.split, func.count(Image.id))
            .where(Image.project_id == project.id, Image.subject == subject)
            .group_by(Image.split)
        )
    }
    if not counts:
        raise NotFound(f"no subject {subject!r} in project {project.name!r} (subjects look like subj-<16 hex>)")
    leaving = tuple(sorted((split, n) for split, n in counts.items() if split != to))
    touches_test = to == "test" or any(split == "test" for split, _ in leaving)
    if leaving and project.test_frozen and touches_test and not force:
        direction = "into" if to == "test" else "out of"
        raise Conflict(
            f"the test split of project {project.name!r} is frozen: moving subject {subject} {direction} test "
            "would change the held-out set; pass --force (with a --reason) if that is really intended"
        )
    forced = bool(leaving) and project.test_frozen and touches_test
    froze = False
    if leaving:
        session.execute(
            update(Image)
            .where(Image.project_id == project.id, Image.subject == subject, Image.split != to)
            .values(split=to)
            .execution_options(synchronize_session="fetch")
        )
        now = utcnow()
        for split, n in leaving:
            session.add(
                SplitChange(
                    project_id=project.id,
                    kind="move",
                    subject=subject,
                    image_id=image_id,
                    from_split=split,
                    to_split=to,
                    images=n,
                    forced=forced,
                    reason=reason,
                    author=author,
                    created_at=now,
                )
            )
        if to == "test":
            froze = freeze_test(session, project, author=author, reason=f"subject {subject} moved into test")
        session.flush()
    return SplitMove(subject, image_id, to, leaving, forced, froze)


@dataclass(frozen=True)
class SplitChangeRecord:
    id: int
    kind: str
    subject: str | None
    image_id: int | None
    from_split: str | None
    to_split: str | None
    images: int
    forced: bool
    reason: str | None
    author: str
    created_at: dt.datetime


def split_log(session: Session, project: Project, *, limit: int = 10_000) -> list[SplitChangeRecord]:
    """The project's split decisions, oldest first."""
    rows = session.scalars(
        select(SplitChange).where(SplitChange.project_id == project.id).order_by(SplitChange.id).limit(limit)
    ).all()
    return [
        SplitChangeRecord(
            r.id,
            r.kind,
            r.subject,
            r.image_id,
            r.from_split,
            r.to_split,
            r.images,
            r.forced,
            r.reason,
            r.author,
            r.created_at,
        )
        for r in rows
    ]


@dataclass(frozen=True)
class SplitSummary:
    test_frozen: bool
    images: dict[str, int]  # split -> frames
    subjects: dict[str, int]  # split -> distinct subjects


def split_summary(session: Session, project: Project) -> SplitSummary:
    rows = session.execute(
        select(Image.split, func.count(Image.id), func.count(func.distinct(Image.subject)))
        .where(Image.project_id == project.id)
        .group_by(Image.split)
    ).all()
    images = {s: 0 for s in SPLIT_VALUES}
    subjects = {s: 0 for s in SPLIT_VALUES}
    for split, n_images, n_subjects in rows:
        images[split], subjects[split] = int(n_images), int(n_subjects)
    return SplitSummary(project.test_frozen, images, subjects)

"""Register a checkpoint trained offline (``sonoseg model train``) as a candidate model version.

The checkpoint is validated (it loads, its sha256 holds, its class map is the project's, in
order), scored on the project's validation labels beside the serving model, and recorded through
:func:`backend.services.versions.register_version` with the gate's verdict as its reason. It
serves only when promoted: by ``--promote-if-better`` (the same gate as a training run's
candidate: :func:`backend.services.gate.decide`) or by a person (``sonoseg models promote``).

A workflow (see :mod:`backend.services`): scoring runs the model, outside any transaction.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from backend.db.base import json_safe
from backend.db.models import Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import CheckpointError, InvalidInput, NotFound
from backend.services import gate, versions
from backend.services.training.plan import evaluate_checkpoint, labelled_images, load_pairs
from backend.settings import Settings
from backend.storage.blobs import BlobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredModel:
    uid: str
    version_id: int
    arch: str
    n_val: int
    decision: gate.GateDecision
    promoted: bool


def register_checkpoint(
    factory: SessionFactory,
    store: BlobStore,
    settings: Settings,
    project_id: int,
    path: Path,
    *,
    promote_if_better: bool = False,
) -> RegisteredModel:
    """Validate, score and register ``path`` for ``project_id``; promote only if asked and the gate agrees."""
    from backend.model.checkpoint import load_checkpoint

    if not path.is_file():
        raise NotFound(f"no checkpoint file {path}")
    checkpoint = load_checkpoint(path)  # CheckpointError: damaged, wrong tensors, unknown format
    with unit_of_work(factory) as session:
        project = session.get(Project, project_id)
        if project is None:
            raise NotFound(f"no project {project_id}")
        classes = tuple(project.class_names)
        val = labelled_images(session, project_id, "val")
        serving = versions.serving_version(session, project_id)
        serving_ref = (serving.uid, serving.checkpoint_key, serving.checkpoint_sha256) if serving else None
    if tuple(checkpoint.spec.classes) != classes:
        raise InvalidInput(
            f"the checkpoint's classes {list(checkpoint.spec.classes)} are not the project's {list(classes)} "
            "(same names, same order): train it with `sonoseg model train --labels "
            f"{','.join(classes)}`"
        )
    pairs = load_pairs(store, val)
    candidate_eval = serving_eval = None
    if val:
        candidate_eval = evaluate_checkpoint(checkpoint, val, pairs, classes, uid="candidate", device=settings.device)
    if val and serving_ref is not None and serving_ref[1]:
        serving_ckpt = load_checkpoint(store.local_path(serving_ref[1]), expected_sha256=serving_ref[2])
        serving_eval = evaluate_checkpoint(
            serving_ckpt, val, pairs, classes, uid=serving_ref[0], device=settings.device
        )
    blob = store.put_file("checkpoints", path, ".safetensors")
    try:
        reloaded = load_checkpoint(store.local_path(blob.key), expected_sha256=blob.sha256)
    except CheckpointError:
        if blob.created:
            store.delete(blob.key)
        raise
    with unit_of_work(factory) as session:
        project = session.get_one(Project, project_id)
        metrics: dict[str, object] = {"n_val": len(val), "registered_from": path.name, "offline": True}
        if candidate_eval is not None:
            metrics.update(candidate_eval.metrics)
            metrics["val_report"] = candidate_eval.report
        version = versions.register_version(
            session,
            project,
            arch=reloaded.spec.arch,
            checkpoint_key=blob.key,
            checkpoint_sha256=blob.sha256,
            metrics=json_metrics(metrics),
        )
        candidate = dataclasses.replace(candidate_eval, model_uid=version.uid) if candidate_eval else None
        decision = gate.decide(
            candidate,
            serving_eval,
            metric=settings.gate_metric,
            margin=settings.gate_margin,
            min_first_score=settings.gate_min_dice,
        )
        current = versions.serving_version(session, project_id)
        if current is not None and serving_ref is not None and current.uid != serving_ref[0]:
            decision = gate.GateDecision(
                False,
                f"the serving model changed while scoring ({serving_ref[0]} -> {current.uid})",
                decision.metric,
                decision.candidate_score,
                decision.serving_score,
            )
        promoted = promote_if_better and decision.promote
        if promoted:
            versions.promote(session, version, reason=f"gate (offline checkpoint): {decision.reason}")
        else:
            version.gate_reason = f"registered offline; gate: {decision.reason}"
        result = RegisteredModel(version.uid, version.id, version.arch or "", len(val), decision, promoted)
    log.info("offline checkpoint %s registered as %s (%s)", path.name, result.uid, decision.reason)
    return result


def json_metrics(metrics: dict[str, object]) -> dict[str, Any]:
    """The metrics as the JSON column stores them (NaN/inf become null)."""
    return cast(dict[str, Any], json_safe(metrics))

"""Bodies as Label Studio 1.23 sends them (shapes read from its serializers): projects, annotations
with brush results encoded by Label Studio's own SDK (as the editor saves them), and webhook events."""

from __future__ import annotations

from typing import Any

import numpy as np

from backend.labelstudio.config import DEFAULT_LABEL_CONFIG

LABELS = ("Nerve", "Vessel")  # the labels of DEFAULT_LABEL_CONFIG: class id i + 1 is LABELS[i]


def project_payload(ls_project_id: int, label_config: str = DEFAULT_LABEL_CONFIG) -> dict[str, Any]:
    return {
        "id": ls_project_id,
        "title": f"project {ls_project_id}",
        "label_config": label_config,
        "created_at": "2026-11-25T10:00:00.000000Z",
    }


def brush_results(mask: np.ndarray) -> list[dict[str, Any]]:
    """One brushlabels region per class present, RLE by label_studio_sdk (the editor's format)."""
    from label_studio_sdk.converter.brush import mask2rle

    h, w = mask.shape
    results = []
    for index, label in enumerate(LABELS, start=1):
        region = mask == index
        if region.any():
            results.append(
                {
                    "id": f"r{index}",
                    "from_name": "tag",
                    "to_name": "image",
                    "type": "brushlabels",
                    "original_width": w,
                    "original_height": h,
                    "image_rotation": 0,
                    "value": {
                        "format": "rle",
                        "rle": mask2rle((region * 255).astype(np.uint8)),
                        "brushlabels": [label],
                    },
                }
            )
    return results


def annotation(
    ann_id: int,
    task_id: int,
    mask: np.ndarray | None,
    *,
    cancelled: bool = False,
    updated_at: str = "2026-11-25T10:00:00Z",
) -> dict[str, Any]:
    return {
        "id": ann_id,
        "result": [] if mask is None else brush_results(mask),
        "was_cancelled": cancelled,
        "ground_truth": False,
        "completed_by": 1,
        "task": task_id,
        "project": None,
        "lead_time": 12.5,
        "created_at": "2026-11-25T10:00:00Z",
        "updated_at": updated_at,
    }


def annotation_event(
    action: str,
    ann_id: int,
    task_id: int,
    image_url: str,
    mask: np.ndarray | None,
    *,
    ls_project_id: int = 3,
    cancelled: bool = False,
    updated_at: str = "2026-11-25T10:00:00Z",
) -> dict[str, Any]:
    return {
        "action": action,
        "annotation": annotation(ann_id, task_id, mask, cancelled=cancelled, updated_at=updated_at),
        "task": {"id": task_id, "data": {"image": image_url}, "project": ls_project_id, "is_labeled": True},
        "project": project_payload(ls_project_id),
    }


def deleted_event(action: str, ids: list[int], ls_project_id: int = 3) -> dict[str, Any]:
    key = "annotations" if action == "ANNOTATIONS_DELETED" else "tasks"
    return {"action": action, key: [{"id": i} for i in ids], "project": project_payload(ls_project_id)}

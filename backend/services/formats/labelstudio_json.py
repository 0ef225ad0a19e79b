"""A Label Studio tasks file: the project's images as tasks, their current masks as brush annotations.

Written::

    DIR/tasks.json          [{"data": {...}, "annotations": [{"result": [brushlabels...]}]}, ...]
    DIR/label_config.xml    the label config those results are for
    DIR/images/<id>.png     the images, as stored (grey PNG)

``data`` holds the image URL under the config's image key (``$image`` -> ``"image"``), plus
``sonoseg_image_id``, ``subject`` (pseudonym) and ``split``, so a re-import maps tasks back to
sonoseg images and keeps subjects together. Results come from
:func:`backend.labelstudio.results.mask_to_results`, the encoder ``/predict`` uses, so they decode
back to the stored mask exactly (``results_to_mask``).

The URL is ``image_url_prefix + "<id>.png"``; the default prefix ``images/`` is relative to the
tasks file, which Label Studio cannot open by itself. Serve ``DIR/images`` to it: local files
storage (``LOCAL_FILES_SERVING_ENABLED``, prefix ``/data/local-files/?d=<path under
LOCAL_FILES_DOCUMENT_ROOT>/images/``), any web server or bucket (prefix ``https://host/images/``),
or skip this file and let ``sonoseg push`` upload frames and masks to a linked project. A Label
Studio-specific default would break every other set-up, so none is assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from backend.db.models import SPLIT_VALUES, Project
from backend.errors import InvalidInput
from backend.imaging.io import decode_png_bytes
from backend.labelstudio.config import ClassMap, LabelConfig, label_config_for, parse_label_config
from backend.labelstudio.results import mask_to_results
from backend.services.formats import OnItem, check_splits, select_items
from backend.services.formats.output_dir import fresh_output_dir
from backend.storage.blobs import BlobStore

__all__ = [
    "DEFAULT_IMAGE_URL_PREFIX",
    "LabelStudioExport",
    "export_label_config",
    "export_labelstudio",
]

DEFAULT_IMAGE_URL_PREFIX = "images/"
TASKS_FILE = "tasks.json"
LABEL_CONFIG_FILE = "label_config.xml"


@dataclass(frozen=True)
class LabelStudioExport:
    tasks_file: Path
    label_config_file: Path
    tasks: int
    annotated: int  # tasks with an annotation (the others: include_unlabelled)


def export_label_config(project: Project) -> tuple[str, LabelConfig]:
    """The label config an export's results are written for: the project's own, else
    :func:`~backend.labelstudio.config.label_config_for` its classes (``tag`` -> ``image``), as for a
    Label Studio project that ``sonoseg project create-ls`` makes.

    Refuses a project config that lacks one of the project's classes: its regions would be
    dropped from the annotations without a trace.
    """
    class_names = tuple(project.class_names)
    xml = project.label_config or label_config_for(class_names)
    config = parse_label_config(xml)
    missing = [name for name in class_names if name not in config.labels]
    if missing:
        raise InvalidInput(
            f"project {project.name!r}'s label config has no label(s) {', '.join(map(repr, missing))}, so their "
            "masks could not be exported as annotations; add them to the project's labeling interface in "
            "Label Studio (the project syncs it), or export with --format png or nnunet"
        )
    return xml, config


def export_labelstudio(
    session: Session,
    store: BlobStore,
    project: Project,
    out_dir: Path,
    *,
    splits: tuple[str, ...] = SPLIT_VALUES,
    include_unlabelled: bool = False,
    image_url_prefix: str = DEFAULT_IMAGE_URL_PREFIX,
    on_item: OnItem | None = None,
) -> LabelStudioExport:
    """Write ``tasks.json``, ``label_config.xml`` and ``images/`` (see the module docstring) to ``out_dir``.

    Labelled images become tasks with one annotation; with ``include_unlabelled`` the others
    become tasks without one (to be labelled). ``out_dir`` must be new or empty.
    """
    if any(ch in image_url_prefix for ch in "\r\n\t "):
        raise InvalidInput(f"the image URL prefix must not contain spaces or line breaks, got {image_url_prefix!r}")
    xml, config = export_label_config(project)
    class_map = ClassMap(tuple(project.class_names))
    splits = check_splits(splits)  # before the folder is made: a typo writes nothing
    with fresh_output_dir(out_dir):
        items = select_items(session, project, splits=splits, include_unlabelled=include_unlabelled)
        (out_dir / LABEL_CONFIG_FILE).write_text(xml, encoding="utf-8")
        (out_dir / "images").mkdir()
        tasks = annotated = 0
        with open(out_dir / TASKS_FILE, "w", encoding="utf-8") as f:
            f.write("[")  # streamed: brush RLE of a large project does not fit comfortably in memory twice
            for item in items:
                name = f"{item.image_id}.png"
                (out_dir / "images" / name).write_bytes(store.get_bytes(item.image_key))
                task: dict[str, Any] = {
                    "data": {
                        config.image_value_key: image_url_prefix + name,
                        "sonoseg_image_id": item.image_id,
                        "subject": item.subject,
                        "split": item.split,
                    }
                }
                if item.mask_key is not None:
                    mask = decode_png_bytes(store.get_bytes(item.mask_key))
                    task["annotations"] = [{"result": mask_to_results(mask, config, class_map)}]
                    annotated += 1
                f.write(",\n" if tasks else "\n")
                json.dump(task, f, separators=(",", ":"))
                tasks += 1
                if on_item is not None:
                    on_item()
            f.write("\n]\n")
    return LabelStudioExport(
        tasks_file=out_dir / TASKS_FILE,
        label_config_file=out_dir / LABEL_CONFIG_FILE,
        tasks=tasks,
        annotated=annotated,
    )

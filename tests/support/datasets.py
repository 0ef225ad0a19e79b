"""Files a curator imports, and the import itself, for the dataset tests.

- :func:`write_png`: an array as a PNG file on disk (folders made), encoded by sonoseg.
- :class:`Importer`: ``backend.services.dataset.import_files`` bound to one test's database, blob
  store and settings, importing into project ``p`` with the tests' two classes unless told otherwise.
  Test modules make one per test with a three-line fixture over ``factory``, ``store`` and ``settings``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from tests.support.models import CLASSES

if TYPE_CHECKING:
    from backend.db.session import SessionFactory
    from backend.services.dataset import ImportReport
    from backend.settings import Settings
    from backend.storage.blobs import BlobStore


def write_png(path: Path, array: NDArray[np.uint8]) -> Path:
    """Write ``array`` to ``path`` as a PNG (``backend.imaging.io.encode_png``), making its folders; returns ``path``."""
    from backend.imaging.io import encode_png

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(array))
    return path


class Importer:
    """``import_files(factory, store, settings, project_name=..., class_names=..., paths=...)`` with the
    first three fixed: ``importer([images], mask_dir=masks, split="test")``."""

    def __init__(
        self, factory: SessionFactory, store: BlobStore, settings: Settings, class_names: tuple[str, ...] = CLASSES
    ) -> None:
        self.factory = factory
        self.store = store
        self.settings = settings
        self.class_names = class_names

    def __call__(self, paths: Sequence[Path], *, project: str = "p", **options: Any) -> ImportReport:
        """Import ``paths`` into ``project``; ``options`` are ``import_files``'s other keyword arguments
        (``mask_dir``, ``split``, ``subject``, ``subject_from``, ``splits_csv``, ``use_patient_id``,
        ``author``, ``on_item``)."""
        from backend.services.dataset import import_files

        return import_files(
            self.factory,
            self.store,
            self.settings,
            project_name=project,
            class_names=self.class_names,
            paths=list(paths),
            **options,
        )

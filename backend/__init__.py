"""sonoseg core: everything but the command line (``cli/``) and the Celery wiring (``workers/``).

Layers, top to bottom (a module imports only from layers below its own; pyproject.toml
[tool.importlinter], checked by ``make lint`` and tests/test_layers.py):

1. ``backend.api`` (the Flask app) beside ``workers`` (Celery), both above
2. ``backend.runtime``: one per process (engine, session factory, store, Label Studio mirror),
3. ``backend.services``: the use cases (take a session from the edge),
4. ``backend.labelstudio`` (the protocol) and ``backend.model`` (the U-Mamba engine),
5. ``backend.imaging`` and ``backend.db``,
6. ``backend.storage``, ``backend.settings``, ``backend.processes``; and ``backend.errors``.

Heavy dependencies (torch, SimpleITK) are imported lazily inside ``backend.model`` and
``backend.imaging`` so that ``sonoseg --help`` and ``/health`` stay instant.
"""

__version__ = "0.1.0"

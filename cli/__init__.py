"""The ``sonoseg`` command: the composition root above ``backend/`` and ``workers/``.

Owns argument parsing, the per-command :class:`backend.runtime.Runtime`, the unit of work each
command opens, and how results are printed. It may import anything; nothing imports it (the layer
rules in ``pyproject.toml`` [tool.importlinter] are checked by ``tests/test_layers.py``).
"""

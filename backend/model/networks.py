"""Build a network from its spec: the one place that knows every built-in architecture module.

:mod:`backend.model.spec` holds the registry (``register_architecture``) and stays free of torch
and of the network modules; importing this module imports :mod:`backend.model.umamba` and
:mod:`backend.model.unet`, whose decorators fill the registry. Keeping the two apart is what
keeps the spec importable (the CLI and the planner read specs without building a network) and
the import graph free of cycles.
"""

from __future__ import annotations

from torch import nn

from backend.errors import InvalidInput
from backend.model import umamba, unet
from backend.model.spec import ARCHITECTURES, ModelSpec

BUILT_IN_MODULES = (umamba, unet)  # imported for their registrations


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised network for ``spec``; raises :class:`InvalidInput` on an unknown arch."""
    factory = ARCHITECTURES.get(spec.arch)
    if factory is None:
        raise InvalidInput(f"unknown architecture {spec.arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return factory(spec)

"""Plain residual U-Net: U-Mamba with the Mamba layers left out, through the same code path.

It exists as a baseline: comparing it with U-Mamba at equal data, budget and machine isolates what
the Mamba layer adds.
"""

from __future__ import annotations

from torch import nn

from backend.model.spec import ModelSpec, register_architecture
from backend.model.umamba import UMamba


@register_architecture("resunet_2d")
def build_resunet(spec: ModelSpec) -> nn.Module:
    return UMamba(spec, "none")

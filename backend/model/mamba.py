"""The Mamba block (selective state-space layer), in pure PyTorch.

Parameter names and shapes match ``mamba_ssm.Mamba`` (v1 block, ``mamba_ssm/modules/
mamba_simple.py``) exactly, so a state dict trained on a GPU with mamba-ssm loads here unchanged,
and back:

    in_proj.weight   (2*d_inner, d_model)         x_proj.weight  (dt_rank + 2*d_state, d_inner)
    conv1d.weight    (d_inner, 1, d_conv)         dt_proj.weight (d_inner, dt_rank)
    conv1d.bias      (d_inner,)                   dt_proj.bias   (d_inner,)
    A_log            (d_inner, d_state)           D              (d_inner,)
    out_proj.weight  (d_model, d_inner)

The scan itself is dispatched by :func:`backend.model.scan.selective_scan` (mamba-ssm's CUDA
kernel, the fused numba kernel for CPU inference, or the linear-cost torch scan for training).
On CUDA with mamba-ssm and causal-conv1d installed, the whole block runs mamba-ssm's fused
``mamba_inner_fn`` instead, as ``mamba_ssm.Mamba`` does (unless the scan backend is forced to
something other than ``cuda``, so tests and benchmarks can compare paths).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from backend.model import scan
from backend.model.scan import selective_scan

logger = logging.getLogger(__name__)


@functools.cache
def _fused_inner_fn() -> Callable[..., torch.Tensor] | None:
    """mamba-ssm's fused block (causal conv + projections + scan), or None when the optional CUDA
    extras are not installed (their imports load CUDA extensions: ImportError/OSError here)."""
    try:
        importlib.import_module("causal_conv1d")  # mamba_inner_fn needs it at call time
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except (ImportError, OSError) as exc:
        logger.debug("fused mamba_inner_fn unavailable: %s", exc)
        return None
    fn: Callable[..., torch.Tensor] = interface.mamba_inner_fn
    return fn


class Mamba(nn.Module):
    """Input and output (batch, L, d_model). Initialisation follows mamba_ssm.Mamba."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        use_fast_path: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=True
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        dt_init_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)

        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _, length, _ = hidden_states.shape
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2*d_inner, L)
        A = -torch.exp(self.A_log.float())
        fused = self._fused_path(hidden_states)
        if fused is not None:
            return fused(
                xz,
                self.conv1d.weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                A,
                None,  # input-dependent B
                None,  # input-dependent C
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias added inside the scan
        y = selective_scan(
            x,
            dt,
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        out: torch.Tensor = self.out_proj(y.transpose(1, 2))
        return out

    def _fused_path(self, hidden_states: torch.Tensor) -> Callable[..., torch.Tensor] | None:
        """mamba-ssm's fused block when it applies here, else None (the dispatched scan is used)."""
        if not (self.use_fast_path and hidden_states.is_cuda) or scan.forced_backend() not in (None, "cuda"):
            return None
        return _fused_inner_fn()

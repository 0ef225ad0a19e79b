"""The Mamba block: mamba_ssm-compatible parameters, state-dict round trip, scan paths agree."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F

from backend.model import mamba as mamba_module
from backend.model.mamba import Mamba
from backend.model.scan import available_backends, use_backend

HAS_NUMBA = "numba" in available_backends()

# Copied by hand from state-spaces/mamba ``mamba_ssm/modules/mamba_simple.py`` (class Mamba, the v1
# block shipped in mamba-ssm 1.x and 2.x; read at commit 52f57d66f8d6d02a73b1e38f5f3708eb8ccfa39c):
# in_proj Linear(d_model, 2*d_inner, bias=False); conv1d Conv1d(d_inner, d_inner, d_conv,
# groups=d_inner, bias=True); x_proj Linear(d_inner, dt_rank + 2*d_state, bias=False); dt_proj
# Linear(dt_rank, d_inner, bias=True); A_log (d_inner, d_state); D (d_inner,); out_proj
# Linear(d_inner, d_model, bias=False); d_inner = expand*d_model; dt_rank = ceil(d_model/16).
# Listed in nn.Module order (the block's own parameters, then its submodules' in registration
# order), which is also the order of mamba_ssm.Mamba's state_dict.
EXPECTED_PARAMETERS = {
    (16, 16, 4, 2): [  # d_inner 32, dt_rank 1
        ("A_log", (32, 16)),
        ("D", (32,)),
        ("in_proj.weight", (64, 16)),
        ("conv1d.weight", (32, 1, 4)),
        ("conv1d.bias", (32,)),
        ("x_proj.weight", (33, 32)),
        ("dt_proj.weight", (32, 1)),
        ("dt_proj.bias", (32,)),
        ("out_proj.weight", (16, 32)),
    ],
    (40, 8, 3, 2): [  # d_inner 80, dt_rank 3
        ("A_log", (80, 8)),
        ("D", (80,)),
        ("in_proj.weight", (160, 40)),
        ("conv1d.weight", (80, 1, 3)),
        ("conv1d.bias", (80,)),
        ("x_proj.weight", (19, 80)),
        ("dt_proj.weight", (80, 3)),
        ("dt_proj.bias", (80,)),
        ("out_proj.weight", (40, 80)),
    ],
}


def oracle_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **_):  # type: ignore[no-untyped-def]
    """Naive sequential scan in float64 (same semantics as mamba_ssm's selective_scan_ref)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y.float()


def block_and_input(d_model: int = 16, length: int = 37, batch: int = 2, seed: int = 0) -> tuple[Mamba, torch.Tensor]:
    torch.manual_seed(seed)
    block = Mamba(d_model, d_state=16, d_conv=4, expand=2)
    with torch.no_grad():  # move A and D away from their structured init so they matter
        block.A_log.add_(0.3 * torch.randn_like(block.A_log))
        block.D.add_(0.5 * torch.randn_like(block.D))
    return block, torch.randn(batch, length, d_model)


@pytest.mark.parametrize("config", sorted(EXPECTED_PARAMETERS))
def test_parameter_names_and_shapes_match_mamba_ssm(config: tuple[int, int, int, int]) -> None:
    d_model, d_state, d_conv, expand = config
    block = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    assert [(n, tuple(p.shape)) for n, p in block.named_parameters()] == EXPECTED_PARAMETERS[config]
    assert list(block.state_dict()) == [n for n, _ in EXPECTED_PARAMETERS[config]]  # no buffers either


def test_state_dict_round_trip_reproduces_outputs() -> None:
    source, x = block_and_input()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    target = Mamba(16, d_state=16, d_conv=4, expand=2)
    with torch.no_grad():
        assert not torch.equal(target(x), source(x))
    target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_output_shape_and_gradients_reach_every_parameter() -> None:
    block, x = block_and_input(length=5)
    x.requires_grad_(True)
    out = block(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_block_with_torch_scan_matches_block_with_oracle_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs and every parameter gradient of the whole block, torch scan vs float64 oracle."""
    block, x = block_and_input(length=45)
    results = {}
    for label in ("torch", "oracle"):
        block.zero_grad()
        with monkeypatch.context() as patch:
            if label == "oracle":
                patch.setattr(mamba_module, "selective_scan", oracle_scan)
            with use_backend("torch"):
                out = block(x)
        out.square().mean().backward()
        results[label] = (out.detach(), {n: p.grad.clone() for n, p in block.named_parameters()})  # type: ignore[union-attr]
    out_t, grads_t = results["torch"]
    out_o, grads_o = results["oracle"]
    scale = out_o.abs().max().item()
    torch.testing.assert_close(out_t, out_o, rtol=1e-4, atol=1e-4 * scale)
    for name, grad in grads_o.items():
        torch.testing.assert_close(grads_t[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba does not import here")
def test_fast_forward_path_matches_autograd_path() -> None:
    block, x = block_and_input(d_model=24, length=300, batch=2)
    with use_backend("torch"):
        training_out = block(x)  # grad enabled: the autograd scan
    assert training_out.requires_grad
    with torch.inference_mode():
        serving_out = block(x)  # CPU, no grad: dispatched to the numba kernel
    with use_backend("numba"), torch.no_grad():
        forced_out = block(x)
    scale = training_out.abs().max().item()
    torch.testing.assert_close(serving_out, training_out.detach(), rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(forced_out, serving_out, rtol=0, atol=0)


@pytest.mark.skipif(
    not torch.cuda.is_available()
    or importlib.util.find_spec("mamba_ssm") is None
    or importlib.util.find_spec("causal_conv1d") is None,
    reason="needs a CUDA GPU with the mamba-ssm and causal-conv1d extras",
)
def test_cuda_fused_block_matches_pure_block() -> None:
    block, x = block_and_input(d_model=32, length=256)
    block, x = block.cuda(), x.cuda()
    fused = block(x)  # mamba_inner_fn
    with use_backend("torch"):
        pure = block(x)
    scale = pure.abs().max().item()
    torch.testing.assert_close(fused, pure, rtol=1e-3, atol=1e-3 * scale)

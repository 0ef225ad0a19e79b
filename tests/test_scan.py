"""Selective-scan backends against a float64 oracle: outputs, every gradient, dispatch, limits.

The oracle is our own copy of the semantics of ``mamba_ssm.ops.selective_scan_interface.
selective_scan_ref`` (real A, B/C of shape (batch, N, L)), run in float64 and differentiated by
plain autograd. Its backward is quadratic in L, which is fine at these sizes (L <= 300).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from backend.errors import InvalidInput, NotReady
from backend.model import scan, scan_torch
from backend.model.scan import (
    available_backends,
    describe_backend,
    selective_scan,
    use_backend,
)

HAS_NUMBA = "numba" in available_backends()
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba does not import here")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):  # type: ignore[no-untyped-def]
    """The naive sequential scan, written for clarity; call it with float64 tensors."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def make_inputs(
    batch: int, d_inner: int, length: int, d_state: int, seed: int = 0, *, with_optional: bool = True
) -> dict[str, torch.Tensor | None]:
    """float64 inputs at Mamba-like scales (dt = softplus(delta + bias) around 0.05-0.5)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    out: dict[str, torch.Tensor | None] = {
        "u": rnd(batch, d_inner, length),
        "delta": rnd(batch, d_inner, length) * 0.5 - 1.5,
        "A": -torch.exp(rnd(d_inner, d_state) * 0.5),
        "B": rnd(batch, d_state, length),
        "C": rnd(batch, d_state, length),
        "D": rnd(d_inner),
        "z": rnd(batch, d_inner, length),
        "delta_bias": rnd(d_inner) * 0.3,
    }
    if not with_optional:
        out.update(D=None, z=None, delta_bias=None)
    return out


def positive_dt(x: dict[str, torch.Tensor | None]) -> None:
    """Without softplus, keep dt = delta + delta_bias positive, as a real step size is: a negative
    one makes exp(dt*A) > 1 and the state grows without bound."""
    x["delta"] = x["delta"].abs() * 0.2  # type: ignore[union-attr]
    if x["delta_bias"] is not None:
        x["delta_bias"] = x["delta_bias"].abs() * 0.1


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    """float32 result vs float64 truth: relative to the tensor's scale, so near-zero entries don't
    turn rounding noise into huge relative errors."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=rtol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}"
    )


# (D, z, delta_bias present?, delta_softplus)
OPTION_SETS = [
    pytest.param(True, True, id="all"),
    pytest.param(False, False, id="bare"),
    pytest.param(False, True, id="bare+softplus"),
    pytest.param(True, False, id="all-no-softplus"),
]


def _call_args(x: dict[str, torch.Tensor | None], dtype: torch.dtype, grad: bool) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().to(dtype).requires_grad_(grad) for t in (x[n] for n in NAMES)]


@pytest.mark.parametrize("length", [1, 7, 64, 300])
@pytest.mark.parametrize(("with_optional", "softplus"), OPTION_SETS)
def test_torch_backend_matches_oracle_outputs_and_all_gradients(
    length: int, with_optional: bool, softplus: bool
) -> None:
    x = make_inputs(2, 18, length, 5, seed=length, with_optional=with_optional)
    if not softplus:
        positive_dt(x)
    ref_args = _call_args(x, torch.float64, True)
    expected = oracle(*ref_args, delta_softplus=softplus)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_grads = torch.autograd.grad(expected, [t for t in ref_args if t is not None], grad_out)

    args = _call_args(x, torch.float32, True)
    actual = selective_scan(*args, delta_softplus=softplus, backend="torch")
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    grads = torch.autograd.grad(actual, [t for t in args if t is not None], grad_out.float())
    assert_close(actual.detach(), expected.detach(), "out")
    present = [n for n, t in zip(NAMES, args, strict=False) if t is not None]
    for name, got, want in zip(present, grads, ref_grads, strict=False):
        assert_close(got, want, f"d{name}")


@needs_numba
@pytest.mark.parametrize("length", [1, 7, 64, 300])
@pytest.mark.parametrize(("with_optional", "softplus"), OPTION_SETS)
@pytest.mark.parametrize("d_inner", [5, 37])  # below one 16-channel block, and blocks plus a remainder
def test_numba_backend_matches_oracle(length: int, with_optional: bool, softplus: bool, d_inner: int) -> None:
    x = make_inputs(2, d_inner, length, 16, seed=length + d_inner, with_optional=with_optional)
    if not softplus:
        positive_dt(x)
    expected = oracle(*_call_args(x, torch.float64, False), delta_softplus=softplus)
    with torch.no_grad():
        actual = selective_scan(*_call_args(x, torch.float32, False), delta_softplus=softplus, backend="numba")
    assert actual.shape == expected.shape
    assert_close(actual, expected, "out")


@pytest.mark.parametrize("max_chunk", [1, 16])
def test_torch_backend_across_many_chunks(monkeypatch: pytest.MonkeyPatch, max_chunk: int) -> None:
    """Force short chunks so state and adjoint carries cross chunk borders (300 = 18*16 + 12)."""
    monkeypatch.setattr(scan_torch, "_MIN_CHUNK", 1)
    monkeypatch.setattr(scan_torch, "_MAX_CHUNK", max_chunk)
    assert scan_torch.chunk_length(300, 2, 6, 4) == max_chunk
    x = make_inputs(2, 6, 300 if max_chunk > 1 else 40, 4, seed=3)
    ref_args = _call_args(x, torch.float64, True)
    expected = oracle(*ref_args, delta_softplus=True)
    ref_grads = torch.autograd.grad(expected.sum(), ref_args)  # type: ignore[arg-type]
    args = _call_args(x, torch.float32, True)
    actual = selective_scan(*args, delta_softplus=True, backend="torch")
    grads = torch.autograd.grad(actual.sum(), args)  # type: ignore[arg-type]
    assert_close(actual.detach(), expected.detach(), "out")
    for name, got, want in zip(NAMES, grads, ref_grads, strict=False):
        assert_close(got, want, f"d{name}")


def test_torch_backend_saves_no_state_sized_tensor_for_backward() -> None:
    """Linear memory: nothing of size batch*d_inner*L*N is kept between forward and backward
    (the quadratic reference keeps several)."""
    batch, d_inner, length, d_state = 1, 32, 2048, 16
    x = make_inputs(batch, d_inner, length, d_state)
    args = _call_args(x, torch.float32, True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan(*args, delta_softplus=True, backend="torch")
    state_sized = batch * d_inner * length * d_state
    assert max(saved) <= batch * d_inner * length
    assert sum(saved) < state_sized
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in args if t is not None)


@needs_numba
def test_dispatch_uses_numba_without_grad_and_torch_with_grad() -> None:
    from backend.model import scan_numba

    x = make_inputs(1, 4, 9, 3)
    spy_numba = mock.patch.object(scan_numba, "selective_scan_numba", wraps=scan_numba.selective_scan_numba)
    spy_torch = mock.patch.object(scan, "selective_scan_torch", wraps=scan_torch.selective_scan_torch)
    with spy_numba as numba_calls, spy_torch as torch_calls:
        with torch.no_grad():
            selective_scan(*_call_args(x, torch.float32, True), delta_softplus=True)
        with torch.inference_mode():
            selective_scan(*_call_args(x, torch.float32, False), delta_softplus=True)
        selective_scan(*_call_args(x, torch.float32, False), delta_softplus=True)  # grad mode, no grad needed
        assert (numba_calls.call_count, torch_calls.call_count) == (3, 0)
        out = selective_scan(*_call_args(x, torch.float32, True), delta_softplus=True)
        assert out.requires_grad and (numba_calls.call_count, torch_calls.call_count) == (3, 1)
        with use_backend("torch"), torch.no_grad():
            selective_scan(*_call_args(x, torch.float32, False), delta_softplus=True)
        assert (numba_calls.call_count, torch_calls.call_count) == (3, 2)


def test_use_backend_is_scoped_and_validated() -> None:
    x = make_inputs(1, 3, 4, 2)
    with use_backend("torch"):
        assert "forced to torch" in describe_backend()
        with use_backend(None):
            assert "forced" not in describe_backend()
    assert "forced" not in describe_backend()
    with pytest.raises(InvalidInput, match="unknown selective-scan backend"), use_backend("triton"):
        pass
    with pytest.raises(InvalidInput, match="unknown selective-scan backend"):
        selective_scan(*_call_args(x, torch.float32, False), backend="fast")


def test_forced_backends_refuse_what_they_cannot_do() -> None:
    x = make_inputs(1, 3, 4, 2)
    with pytest.raises((InvalidInput, NotReady), match="cuda"):
        selective_scan(*_call_args(x, torch.float32, False), backend="cuda")
    if HAS_NUMBA:
        with pytest.raises(InvalidInput, match="forward-only"):
            selective_scan(*_call_args(x, torch.float32, True), backend="numba")


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("delta", (1, 3, 5)),
        ("A", (4, 2)),
        ("B", (1, 2, 5)),
        ("C", (1, 3, 4)),
        ("D", (2,)),
        ("z", (1, 3, 5)),
        ("delta_bias", (4,)),
    ],
)
def test_shape_mismatches_are_rejected(name: str, shape: tuple[int, ...]) -> None:
    x = make_inputs(1, 3, 4, 2)
    x[name] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(InvalidInput, match=name):
        selective_scan(*_call_args(x, torch.float32, False))


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
def test_low_precision_inputs_compute_in_float32_under_autocast(backend: str) -> None:
    x = make_inputs(2, 8, 33, 4, seed=5)
    low = _call_args(x, torch.bfloat16, False)
    expected = oracle(*[None if t is None else t.double() for t in low], delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = selective_scan(*low, delta_softplus=True, backend=backend)
    assert out.dtype == torch.bfloat16
    # The only error left is the final rounding to bfloat16 (8 bits of mantissa).
    assert_close(out.float(), expected, "out", rtol=1e-2)


@needs_numba
def test_numba_exp_is_accurate_over_the_float32_range() -> None:
    from backend.model.scan_numba import exp32

    x = torch.linspace(-87.0, 88.3, 400_001)
    got = exp32(x).double()
    want = torch.exp(x.double())
    assert ((got - want).abs() / want).max().item() < 5e-7  # a few float32 ulp (ulp = 6e-8)
    assert torch.equal(exp32(torch.tensor([0.0])), torch.tensor([1.0]))
    assert exp32(torch.tensor([-200.0])).item() < 1e-37  # clamped, not garbage


def test_available_backends_and_description() -> None:
    names = available_backends()
    assert names[-1] == "torch" and set(names) <= {"cuda", "numba", "torch"}
    assert ("cuda" in names) == (torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None)
    text = describe_backend()
    assert "training: torch" in text and ("numba" in text) == HAS_NUMBA


@needs_numba
def test_warmup_compiles_the_cpu_kernels() -> None:
    assert scan.warmup() >= 0.0
    assert "layer" in describe_backend()


def _scan_sum_in_child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    x = make_inputs(1, 20, 30, 4, seed=9)
    with torch.no_grad():
        queue.put(selective_scan(*_call_args(x, torch.float32, False), delta_softplus=True).sum().item())


@needs_numba
def test_numba_kernel_still_works_in_a_child_forked_after_it_ran() -> None:
    """Celery prefork / a server that warms up then forks: with numba's GNU-OpenMP layer the child
    would be killed ("fork() called from a process already using GNU OpenMP")."""
    x = make_inputs(1, 20, 30, 4, seed=9)
    with torch.no_grad():
        expected = selective_scan(*_call_args(x, torch.float32, False), delta_softplus=True).sum().item()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_scan_sum_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(expected, rel=1e-6)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None,
    reason="needs a CUDA GPU and the mamba-ssm extra",
)
@pytest.mark.parametrize("length", [7, 300, 2048])
def test_cuda_kernel_matches_pure_torch_path(length: int) -> None:
    """mamba-ssm's fused kernel vs our torch path on the same GPU: outputs and all gradients."""
    x = make_inputs(2, 64, length, 16, seed=length)
    grads = {}
    outs = {}
    for backend in ("cuda", "torch"):
        args = [None if t is None else t.detach().float().cuda().requires_grad_() for t in (x[n] for n in NAMES)]
        out = selective_scan(*args, delta_softplus=True, backend=backend)
        out.backward(torch.ones_like(out))
        outs[backend] = out.detach().double()
        grads[backend] = [t.grad.double() for t in args if t is not None]  # type: ignore[union-attr]
    assert_close(outs["cuda"], outs["torch"], "out", rtol=1e-3)
    for name, got, want in zip(NAMES, grads["cuda"], grads["torch"], strict=False):
        assert_close(got, want, f"d{name}", rtol=1e-3)

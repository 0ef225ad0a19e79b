"""Selective scan (the S6 recurrence at the heart of Mamba) behind one function.

:func:`selective_scan` mirrors ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` for
the Mamba v1 block (real ``A``, input-dependent ``B``/``C`` of shape (batch, N, L)) and picks a
backend per call:

``cuda``   mamba-ssm's fused kernel: CUDA tensors and the optional ``mamba-ssm`` extra installed.
``numba``  a fused, forward-only CPU kernel (:mod:`backend.model.scan_numba`): CPU tensors when
           no gradient is needed (serving, validation). 2-4x faster than ``torch`` forward.
``torch``  pure PyTorch with a hand-written linear-cost backward (:mod:`backend.model.scan_torch`):
           training anywhere else, and the fallback on every device.

Force one with ``selective_scan(..., backend="torch")`` or, for a whole block of code (tests,
benchmarks), ``with use_backend("torch"): ...``. Every backend computes in float32, with autocast
off inside (Mamba's SSM runs in fp32 under AMP), and returns the dtype of ``u``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from types import ModuleType

import torch

from backend.errors import InvalidInput, NotReady
from backend.model.scan_torch import selective_scan_torch

logger = logging.getLogger(__name__)

BACKENDS = ("cuda", "numba", "torch")
_forced: ContextVar[str | None] = ContextVar("sonoseg_scan_backend", default=None)


@functools.cache
def _mamba_ssm_scan() -> Callable[..., torch.Tensor] | None:
    """mamba-ssm's ``selective_scan_fn``, or None: it is an optional extra and its import loads a
    CUDA extension, which fails (ImportError/OSError) on CPU-only installs."""
    try:
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except (ImportError, OSError) as exc:
        logger.debug("mamba-ssm unavailable: %s", exc)
        return None
    fn: Callable[..., torch.Tensor] = interface.selective_scan_fn
    return fn


@functools.cache
def _numba_scan() -> ModuleType | None:
    """The numba kernel module, or None when numba (a core dependency) is missing or broken:
    numba raises RuntimeError at import when it finds no writable cache directory."""
    try:
        from backend.model import scan_numba
    except (ImportError, RuntimeError, OSError) as exc:
        logger.warning("numba unavailable, CPU inference uses the torch scan: %s", exc)
        return None
    return scan_numba


def available_backends() -> list[str]:
    """Backends usable in this process, in order of preference."""
    found = []
    if torch.cuda.is_available() and _mamba_ssm_scan() is not None:
        found.append("cuda")
    if _numba_scan() is not None:
        found.append("numba")
    found.append("torch")
    return found


def describe_backend() -> str:
    """One line for logs and ``sonoseg status``: which backend serves which case here."""
    parts = []
    if torch.cuda.is_available():
        if _mamba_ssm_scan() is not None:
            version = getattr(importlib.import_module("mamba_ssm"), "__version__", "?")
            parts.append(f"CUDA: cuda (mamba-ssm {version} kernel)")
        else:
            parts.append("CUDA: torch (mamba-ssm not installed)")
    module = _numba_scan()
    if module is not None:
        parts.append(f"CPU inference: numba {module.describe()}")
    else:
        parts.append("CPU inference: torch (numba unavailable)")
    parts.append(f"training: torch chunked scan ({torch.get_num_threads()} threads)")
    forced = _forced.get()
    prefix = f"selective scan forced to {forced}; " if forced else "selective scan: "
    return prefix + "; ".join(parts)


def warmup() -> float:
    """Compile or load the CPU kernels now (~2-3 s cold, well under 1 s cached); returns seconds.

    The server and workers call this at start-up so the first request does not pay for it.
    """
    module = _numba_scan()
    seconds = module.warmup() if module is not None else 0.0
    logger.info("selective scan ready in %.2f s (%s)", seconds, describe_backend())
    return seconds


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every :func:`selective_scan` call in this block (thread/task-local) to ``name``."""
    _check_name(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by an enclosing :func:`use_backend` block, if any."""
    return _forced.get()


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """y = scan(u) with u, delta, z: (batch, d_inner, L); A: (d_inner, N); B, C: (batch, N, L);
    D, delta_bias: (d_inner,).

    h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = C_t . h_t + D u_t, out = y * silu(z), where
    dt = softplus(delta + delta_bias) if ``delta_softplus`` else delta + delta_bias.
    Returns (batch, d_inner, L) in u's dtype (not necessarily contiguous); computes in float32.
    ``backend`` (or :func:`use_backend`) forces ``"cuda"``, ``"numba"`` or ``"torch"``.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = _choose(backend if backend is not None else _forced.get(), u, (u, delta, A, B, C, D, z, delta_bias))
    dtype_in = u.dtype
    impl = _implementation(name)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u32, delta32, A32, B32, C32 = (t.float() for t in (u, delta, A, B, C))
        D32, z32, bias32 = (None if t is None else t.float() for t in (D, z, delta_bias))
        out = impl(u32, delta32, A32, B32, C32, D32, z32, bias32, delta_softplus)
    return out.to(dtype_in)


def _implementation(name: str) -> Callable[..., torch.Tensor]:
    """The function behind a backend name already checked by :func:`_choose`."""
    if name == "cuda":
        fn = _mamba_ssm_scan()
    elif name == "numba":
        module = _numba_scan()
        fn = module.selective_scan_numba if module is not None else None
    else:
        fn = selective_scan_torch
    if fn is None:  # _choose only picks available backends
        raise NotReady(f"the {name} selective-scan backend is not available here")
    return fn


def _check_name(name: str | None) -> None:
    if name is not None and name not in BACKENDS:
        raise InvalidInput(f"unknown selective-scan backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _choose(forced: str | None, u: torch.Tensor, tensors: tuple[torch.Tensor | None, ...]) -> str:
    """The backend for this call: the forced one if usable, else the fastest that fits."""
    _check_name(forced)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    on_cpu = u.device.type == "cpu"
    if forced == "cuda":
        if not u.is_cuda:
            raise InvalidInput("the cuda selective-scan backend needs CUDA tensors")
        if _mamba_ssm_scan() is None:
            raise NotReady("the cuda selective-scan backend needs mamba-ssm: pip install 'sonoseg[cuda]'")
    elif forced == "numba":
        if not on_cpu:
            raise InvalidInput(f"the numba selective-scan backend runs on CPU tensors, not {u.device}")
        if needs_grad:
            raise InvalidInput("the numba selective-scan backend is forward-only: use torch for training")
        if _numba_scan() is None:
            raise NotReady("the numba selective-scan backend needs numba, which does not import here")
    if forced is not None:
        name = forced
    elif u.is_cuda and _mamba_ssm_scan() is not None:
        name = "cuda"
    elif on_cpu and not needs_grad and _numba_scan() is not None:
        name = "numba"
    else:
        name = "torch"
    _announce(name)
    return name


@functools.cache
def _announce(name: str) -> None:
    """Log the first use of each backend in this process (once, not per call)."""
    logger.info("selective scan: first call on the %s backend", name)


def _check_shapes(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    """Reject what the backends would silently broadcast or mis-read: cheap, shapes only."""
    if u.dim() != 3:
        raise InvalidInput(f"selective_scan: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, d_inner, length = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner or A.is_complex():
        raise InvalidInput(f"selective_scan: A must be real (d_inner={d_inner}, N), got {tuple(A.shape)} {A.dtype}")
    d_state = A.shape[1]
    expected: dict[str, tuple[torch.Tensor | None, tuple[int, ...]]] = {
        "delta": (delta, (batch, d_inner, length)),
        "B": (B, (batch, d_state, length)),
        "C": (C, (batch, d_state, length)),
        "D": (D, (d_inner,)),
        "z": (z, (batch, d_inner, length)),
        "delta_bias": (delta_bias, (d_inner,)),
    }
    if A.device != u.device:
        raise InvalidInput(f"selective_scan: A is on {A.device} but u is on {u.device}")
    for label, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise InvalidInput(f"selective_scan: {label} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor is not None and tensor.device != u.device:
            raise InvalidInput(f"selective_scan: {label} is on {tensor.device} but u is on {u.device}")

"""Selective-scan backends at the U-Mamba shapes, against the naive quadratic reference.

    .venv/bin/python bench/bench_scan.py            # CPU, 2 threads
    .venv/bin/python bench/bench_scan.py --quick    # three shapes, for a smoke run
    .venv/bin/python bench/bench_scan.py --device cuda   # GPU: mamba-ssm kernel vs torch path

Shapes follow the 8-stage 512x512 U-Mamba (features 32 doubling to 512, d_inner = 2*C, N = 16):
the Mamba sequence is the flattened feature map, L = H*W of the stage. The reference is our copy
of ``mamba_ssm``'s ``selective_scan_ref`` (float32, plain autograd): its backward is quadratic in
L, so beyond L=256 it is skipped where a fit of its measured times predicts more than 30 s, or
wherever its tensors would need more than 8 GiB. Times are the best of up to 5 runs after one
warm-up run (of two runs, warm-up included, when a call takes over 2 s). Ratios are speed-ups
against the reference (or, where that is skipped, against the torch path) measured in the same
run. Never run by the test suite; about 1-4 minutes on 2 cores, depending on outside load.

On a CPU shared with other busy processes, prefix ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP
threads otherwise spin at every parallel region, and the torch columns (the torch path enters ~3
regions per time step) slow down 2-15x, measured at L=256 with a load average of 3 on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "2")  # before numba is imported, below

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.model import scan

D_STATE = 16
# (L, d_inner, batch): stages of the 512x512, 8-stage U-Mamba. (cpu_small, 256x256 with features
# 16..256, has d_inner 32..512 at the same L: cheaper than these rows.)
SHAPES = [
    (16, 1024, 2),
    (64, 1024, 2),
    (256, 1024, 2),
    (1024, 1024, 2),
    (4096, 512, 1),
    (16384, 256, 1),
    (65536, 128, 1),
]
QUICK_SHAPES = [(64, 1024, 2), (256, 1024, 2), (4096, 512, 1)]
REF_MAX_SECONDS = 30.0
REF_ALWAYS_UP_TO = 256  # L=256 (d_inner 1024, batch 2) is where the 20x requirement is checked
REF_MAX_BYTES = 8 << 30


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):  # type: ignore[no-untyped-def]
    """selective_scan_ref semantics: materialises (b, d, L, N) and loops; backward is O(L^2)."""
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


def make_inputs(length: int, d_inner: int, batch: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sequence, state, channel = (batch, d_inner, length), (batch, D_STATE, length), (d_inner,)
    shapes = [sequence, sequence, (d_inner, D_STATE), state, state, channel, sequence, channel]
    u, delta, A, B, C, D, z, bias = (torch.randn(s, generator=g) for s in shapes)
    A = -torch.exp(0.5 * A)
    delta = 0.5 * delta - 1.5
    return [t.to(device) for t in (u, delta, A, B, C, D, z, bias)]


def best_time(fn: Callable[[], object], device: str, repeats: int = 5, budget: float = 2.0) -> float:
    """Best wall time of ``fn`` after one warm-up call (the minimum filters out other processes'
    load); a call slower than ``budget`` is timed twice at most, warm-up included."""

    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    first = once()
    if first > budget:  # slow: one more run (unless very slow), to dodge a burst of outside load
        return min(first, once()) if first < 15 * budget else first
    return min(once() for _ in range(max(1, min(repeats, int(budget / max(first, 1e-6))))))


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    def run() -> object:
        args = [t.detach().requires_grad_() for t in inputs]
        out = fn(*args, delta_softplus=True)
        torch.autograd.backward([out], [torch.ones_like(out)])
        return out

    return run


def fwd_only(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn(*inputs, delta_softplus=True)

    return run


def backend_fn(name: str) -> Callable[..., torch.Tensor]:
    return functools.partial(scan.selective_scan, backend=name)


class ReferenceCost:
    """Predicts the reference's fwd+bwd time as c * b*d*N*L^2 from its longest measured run."""

    def __init__(self) -> None:
        self.coeff = 0.0

    def observe(self, length: int, d_inner: int, batch: int, seconds: float) -> None:
        self.coeff = seconds / (batch * d_inner * D_STATE * length**2)  # latest = largest L: least overhead

    def skip_reason(self, length: int, d_inner: int, batch: int, backward: bool) -> str | None:
        # decay, drive and (with autograd) the per-step slices it keeps: ~4 state-sized tensors.
        state_bytes = 4 * batch * d_inner * length * D_STATE * (4 if backward else 2)
        if state_bytes > REF_MAX_BYTES:
            return f"needs ~{state_bytes / 2**30:.0f} GiB"
        predicted = self.coeff * batch * d_inner * D_STATE * length**2
        if backward and predicted > REF_MAX_SECONDS and length > REF_ALWAYS_UP_TO:
            return f"predicted ~{predicted:.0f} s"
        return None


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "skipped"
    return f"{seconds * 1e3:9.1f}ms" if seconds < 10 else f"{seconds:9.1f}s "


def ratio(base: float | None, other: float | None) -> str:
    return f"{base / other:7.1f}x" if base is not None and other is not None else "      -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="three shapes only")
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    started = time.perf_counter()
    warm = scan.warmup()
    fast = "numba" if opts.device == "cpu" else "cuda"
    have_fast = fast in scan.available_backends()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {opts.device}, {os.cpu_count()} CPUs")
    print(
        f"load average at start: {os.getloadavg()[0]:.2f} (other processes skew every column),"
        f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(scan.describe_backend())
    print(f"warmup (numba compile or cache load): {warm:.2f} s")
    print("speed-ups: 'vs ref' = reference time / backend time; 'vs torch' = torch path / fast path\n")
    # The CPU fast path (numba) is forward-only; the CUDA one (mamba-ssm) also times fwd+bwd.
    fast_trains = fast == "cuda"
    header = f"{'L':>6} {'d_inner':>7} {'b':>2} | fwd+bwd: {'ref':>11} {'torch':>11} {'vs ref':>7}"
    if fast_trains:
        header += f" {fast:>11} {'vs torch':>8}"
    header += f" | fwd: {'ref':>11} {'torch':>11} {fast:>11} {'torch/ref':>9} {fast + '/ref':>9} {'vs torch':>8}"
    print(header)
    print("-" * len(header))
    cost = ReferenceCost()
    for length, d_inner, batch in QUICK_SHAPES if opts.quick else SHAPES:
        inputs = make_inputs(length, d_inner, batch, opts.device)
        skip_bwd = cost.skip_reason(length, d_inner, batch, backward=True)
        skip_fwd = cost.skip_reason(length, d_inner, batch, backward=False)
        ref_bwd = None if skip_bwd else best_time(fwd_bwd(reference_scan, inputs), opts.device)
        if ref_bwd is not None:
            cost.observe(length, d_inner, batch, ref_bwd)
        torch_bwd = best_time(fwd_bwd(backend_fn("torch"), inputs), opts.device)
        ref_fwd = None if skip_fwd else best_time(fwd_only(reference_scan, inputs), opts.device)
        torch_fwd = best_time(fwd_only(backend_fn("torch"), inputs), opts.device)
        fast_fwd = best_time(fwd_only(backend_fn(fast), inputs), opts.device) if have_fast else None
        row = f"{length:>6} {d_inner:>7} {batch:>2} | {'':8} {fmt(ref_bwd):>11} {fmt(torch_bwd):>11}"
        row += f" {ratio(ref_bwd, torch_bwd):>7}"
        if fast_trains:
            fast_bwd = best_time(fwd_bwd(backend_fn(fast), inputs), opts.device) if have_fast else None
            row += f" {fmt(fast_bwd):>11} {ratio(torch_bwd, fast_bwd):>8}"
        row += f" | {'':4} {fmt(ref_fwd):>11} {fmt(torch_fwd):>11} {fmt(fast_fwd):>11}"
        row += f" {ratio(ref_fwd, torch_fwd):>9} {ratio(ref_fwd, fast_fwd):>9} {ratio(torch_fwd, fast_fwd):>8}"
        print(row, flush=True)
        for label, reason in (("fwd+bwd", skip_bwd), ("fwd", skip_fwd)):
            if reason:
                print(f"{'':17}reference {label} skipped: {reason}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s, load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

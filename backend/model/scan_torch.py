"""Selective scan in pure PyTorch, with a hand-written backward whose cost is linear in L.

Why not just let autograd differentiate a loop: ``mamba_ssm``'s ``selective_scan_ref`` builds the
(batch, d_inner, L, N) tensors up front and indexes one step at a time, so its backward scatters
each step into a zero tensor of the full size: O(L^2) work (about 8 s for one fwd+bwd at L=256,
d_inner=1024, batch 2 on 2 CPU cores, against about 0.1 s here).

Layout and cost. Everything runs time-major, (L, batch, d_inner[, N]), so one time step is one
contiguous slab and the recurrence is a single in-place ``addcmul_`` per step. The sequence is cut
into chunks of ``T`` steps: a chunk's (T, batch, d_inner, N) decay and state tensors exist only
while that chunk is processed, and the forward keeps just the state entering each chunk
((L/T, batch, d_inner, N)), so memory stays bounded at L=65,536. The backward recomputes a
chunk's states from its checkpoint, then runs the adjoint recurrence
``dh_t = C_t dy_t + exp(dt_{t+1} A) dh_{t+1}`` backwards through it.

Only the core ``y_t = C_t . h_t`` is a custom ``autograd.Function``; the bias, softplus, D skip and
z gate are ordinary tensor ops around it, so autograd derives their gradients. No double backward.

Measured alternative: a log-depth (Hillis-Steele) scan inside each chunk, which trades per-step
Python calls for log2(T) times the arithmetic, was 3-4x slower on CPU at L=256 (d_inner 1024) and
2x slower at L=16384 (d_inner 128), and only on par at L=65536. It might pay on a GPU without
mamba-ssm, where each per-step call is a kernel launch; that case is not tuned here. On a CPU
shared with other busy processes, torch's OpenMP threads spin at each parallel region and this
path slows down several-fold unless OMP_WAIT_POLICY=PASSIVE (see ``bench/bench_scan.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Target size (elements) of one chunk's (T, batch, d_inner, N) tensors: ~2 MiB in float32 keeps
# them cache-friendly. Measured at the U-Mamba shapes on 2 cores: the best T was 16-64 for
# batch*d_inner = 2048 and 256-1024 for batch*d_inner = 64-128, which this target reproduces.
_CHUNK_ELEMENTS = 1 << 19
_MIN_CHUNK, _MAX_CHUNK = 16, 1024


def chunk_length(length: int, batch: int, d_inner: int, d_state: int) -> int:
    """Time steps per chunk for these sizes (a power of two, at most ``length``)."""
    width = max(1, batch * d_inner * d_state)
    steps = max(_MIN_CHUNK, min(_MAX_CHUNK, _CHUNK_ELEMENTS // width))
    steps = 1 << (steps.bit_length() - 1)
    return max(1, min(steps, length))


def _chunk_states(
    dt: torch.Tensor, dtu: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decays exp(dt*A) and states h for one chunk, both (T, batch, d_inner, N).

    dt, dtu: (T, batch, d_inner); A: (d_inner, N); B: (T, batch, N); h0: (batch, d_inner, N).
    """
    decay = torch.exp(dt.unsqueeze(-1) * A)
    states = dtu.unsqueeze(-1) * B.unsqueeze(2)  # the input term dt*u*B, overwritten by h
    prev = h0
    for h_t, decay_t in zip(states.unbind(0), decay.unbind(0), strict=False):
        h_t.addcmul_(decay_t, prev)
        prev = h_t
    return decay, states


class _ScanCore(torch.autograd.Function):
    """y_t = C_t . h_t, h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, h_{-1} = 0. All time-major."""

    @staticmethod
    def forward(
        ctx: Any, dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
    ) -> torch.Tensor:
        length, batch, d_inner = dt.shape
        d_state = A.shape[1]
        steps = chunk_length(length, batch, d_inner, d_state)
        n_chunks = -(-length // steps)
        dtu = dt * u
        y = dt.new_empty(length, batch, d_inner)
        checkpoints = dt.new_empty(n_chunks, batch, d_inner, d_state)
        h = dt.new_zeros(batch, d_inner, d_state)
        for index in range(n_chunks):
            start, stop = index * steps, min(index * steps + steps, length)
            n = stop - start
            checkpoints[index] = h
            _, states = _chunk_states(dt[start:stop], dtu[start:stop], A, B[start:stop], h)
            # y[t, b, :] = states[t, b] @ C[t, b]: one batched mat-vec per (t, b).
            torch.bmm(
                states.view(n * batch, d_inner, d_state),
                C[start:stop].reshape(n * batch, d_state, 1),
                out=y[start:stop].view(n * batch, d_inner, 1),
            )
            h = states[-1]
        ctx.save_for_backward(dt, u, A, B, C, checkpoints)
        ctx.steps = steps
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dt, u, A, B, C, checkpoints = ctx.saved_tensors
        steps: int = ctx.steps
        length, batch, d_inner = dt.shape
        d_state = A.shape[1]
        dy = dy.contiguous()
        dtu = dt * u
        d_dt = torch.empty_like(dt)
        d_dtu = torch.empty_like(dt)
        d_A = torch.zeros_like(A)
        d_B = torch.empty_like(B)
        d_C = torch.empty_like(C)
        # exp(dt_{t+1} A) * dh_{t+1} flowing from the chunk after the current one.
        carry = dt.new_zeros(batch, d_inner, d_state)
        for index in reversed(range(checkpoints.shape[0])):
            start, stop = index * steps, min(index * steps + steps, length)
            n = stop - start
            rows = n * batch
            h0 = checkpoints[index]
            decay, states = _chunk_states(dt[start:stop], dtu[start:stop], A, B[start:stop], h0)
            dy_c = dy[start:stop]
            torch.bmm(
                dy_c.view(rows, 1, d_inner),
                states.view(rows, d_inner, d_state),
                out=d_C[start:stop].view(rows, 1, d_state),
            )
            # dh starts as C_t dy_t (an outer product per step), then the reverse recurrence.
            dh = torch.bmm(dy_c.view(rows, d_inner, 1), C[start:stop].reshape(rows, 1, d_state))
            dh = dh.view(n, batch, d_inner, d_state)
            dh[-1] += carry
            dh_steps, decay_steps = dh.unbind(0), decay.unbind(0)
            for t in range(n - 2, -1, -1):
                dh_steps[t].addcmul_(decay_steps[t + 1], dh_steps[t + 1])
            carry = decay_steps[0] * dh_steps[0]
            # The input term dt*u*B: d(dt*u) = dh . B_t, dB_t = sum over d_inner of dh * dt*u.
            torch.bmm(
                dtu[start:stop].view(rows, 1, d_inner),
                dh.view(rows, d_inner, d_state),
                out=d_B[start:stop].view(rows, 1, d_state),
            )
            torch.bmm(
                dh.view(rows, d_inner, d_state),
                B[start:stop].reshape(rows, d_state, 1),
                out=d_dtu[start:stop].view(rows, d_inner, 1),
            )
            # The decay term: d(dt*A) = dh * h_{t-1} * exp(dt*A), computed in place in dh.
            g = dh.mul_(decay)
            g[1:] *= states[:-1]
            g[0] *= h0
            d_A += torch.einsum("kdn,kd->dn", g.view(rows, d_inner, d_state), dt[start:stop].reshape(rows, d_inner))
            torch.sum(g.mul_(A), dim=-1, out=d_dt[start:stop])
        d_dt.addcmul_(d_dtu, u)
        d_u = d_dtu.mul_(dt)
        return d_dt, d_u, d_A, d_B, d_C


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The scan on any device, differentiable in every tensor argument.

    Expects float32 tensors already validated by :func:`backend.model.scan.selective_scan`
    (u, delta, z: (batch, d_inner, L); A: (d_inner, N); B, C: (batch, N, L)). Returns
    (batch, d_inner, L) float32, possibly non-contiguous.
    """
    pre = delta.permute(2, 0, 1)
    if delta_bias is not None:
        pre = pre + delta_bias
    dt = F.softplus(pre) if delta_softplus else pre
    u_t = u.permute(2, 0, 1).contiguous()
    y: torch.Tensor = _ScanCore.apply(  # type: ignore[no-untyped-call]
        dt.contiguous(), u_t, A.contiguous(), B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()
    )
    if D is not None:
        y = y + u_t * D
    if z is not None:
        y = y * F.silu(z.permute(2, 0, 1))
    return y.permute(1, 2, 0)

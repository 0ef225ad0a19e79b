"""Choosing the torch device from the ``auto | cpu | cuda`` setting, and its mixed-precision dtype."""

from __future__ import annotations

import contextlib
import functools

import torch

from backend.errors import InvalidInput, NotReady


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is an error, not a fallback."""
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise NotReady("device 'cuda' requested but no CUDA GPU is available; use 'cpu' or 'auto'")
        return torch.device(name)
    raise InvalidInput(f"device must be auto, cpu or cuda, not {name!r}")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bfloat16 convolutions natively (AVX512-BF16 or AMX)."""
    try:
        available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        return bool(available and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mixed_precision_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype worth using on ``device``: float16 on CUDA (nnU-Net's AMP), bfloat16 on
    CPUs with native support (1.6x faster training and 1.4x faster inference for ``cpu_small`` on
    the 2-core EPYC it was sized on), None (stay float32) elsewhere, where bfloat16 is emulated."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def inference_memory_format(device: torch.device) -> torch.memory_format:
    """The tensor layout a network should be served in on ``device``.

    Channels-last on the CPU: oneDNN's convolutions work on channels-interleaved blocks, and with
    a contiguous (NCHW) tensor every convolution reorders its input and output; with the model and
    input in channels-last the ``cpu_small`` forward of a 512x512 frame was ~15% faster in float32
    on the AVX2 kernels and in bfloat16 (docs/benchmarks.md; it needs :class:`~backend.model.umamba.InstanceNorm`,
    as ``nn.InstanceNorm2d`` copies channels-last input back). Contiguous elsewhere: not measured
    on a GPU.
    """
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[object]:
    """Autocast to :func:`mixed_precision_dtype` when ``enabled`` and worthwhile, else a no-op."""
    dtype = mixed_precision_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's upper bound for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2); mallopt refuses more.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


@functools.cache
def keep_freed_memory_mapped() -> bool:
    """Stop glibc from handing large freed blocks back to the kernel; True when applied.

    Why: by default glibc serves every block above a (dynamic, 128 KiB to 32 MiB) threshold with
    its own ``mmap`` and unmaps it on free. A network forward on the CPU allocates and frees tens of
    MiB of activations, so every forward touched fresh pages: ~7,500-9,400 page faults per
    ``cpu_small`` 256x256 forward on the 2-core dev VM, which cost about a fifth of its time (median
    forward 132-146 ms with them, 115 ms without; see docs/benchmarks.md). With mmap capped at
    glibc's maximum and trimming off, freed activations stay in the heap and the next forward
    reuses them: zero page faults per forward. The price is that the process keeps its peak heap,
    which for a serving or training process is what it needs again at the next frame anyway.
    PyTorch's own advice is to preload jemalloc or tcmalloc; jemalloc measured *more* page faults
    here (its default decay returns pages within seconds), and a preload cannot be set from inside
    a running process, so this is glibc's own knob, applied once per process.
    No-op (False) on other C libraries, or when ``SONOSEG_KEEP_FREED_MEMORY=0``.
    """
    import ctypes
    import os
    import platform

    if os.environ.get("SONOSEG_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; a refused value leaves glibc's default in place.
    applied = int(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) == 1
    return int(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) == 1 and applied

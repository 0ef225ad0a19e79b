"""Label Studio brush RLE: the thi.ng ``rle-pack`` bit stream.

Layout (MSB first): 32 bits word count N, 5 bits (word size - 1), four 4-bit fields
(rle size - 1); then chunks of ``flag(1) | size index(2) | n(rleSizes[index])`` where flag 1
means "one word repeated n+1 times" and flag 0 means "n+1 literal words"; zero padding to a
byte. A brush region is the RGBA uint8 image of the whole picture, flattened row-major.

The encoder reproduces ``label_studio_sdk.converter.brush.encode_rle`` byte for byte, quirks
included, so that our predictions and the SDK's are interchangeable and testable against it:
word size 8 and rle sizes [3, 4, 8, 16]; every run of length 1 is its own literal chunk; a
run longer than 256 words uses 16-bit chunks of at most 65536 words (its remainder too, even
when short); and the padding is always 1 to 8 zero bits, so a stream that already ends on a
byte boundary gets one extra zero byte.

The decoder accepts any stream a thi.ng encoder may write (literal chunks of many words, any
rle sizes) with word sizes up to 8 bits. Untrusted streams are bounded before any allocation:
the header's word count must equal ``expected_length`` when given, and may never exceed what
the stream's bytes can hold (at most ``2**s`` words per ``3 + s + word size`` bits); a list
longer than any stream of ``expected_length`` words can be is refused before it is copied.
The chunks are then walked and expanded in one numba pass (``rle_kernels.decode_stream``)
whose only memory is the output: the earlier Python walk + numpy expansion took ~290 bytes of
temporaries per input byte on a literal stream of 1-bit words (2.4 GB for a 4096x4096 region)
and ~0.5 s per million chunks.

The encoders run in numba kernels (:mod:`backend.labelstudio.rle_kernels`): one compiled call
finds the runs and writes the bits. On a 512x512 nerve mask that is ~3x faster than the numpy
encoder it replaced, whose ~65 array calls of ~1 us each dominated, and ~50x faster than the
SDK (bench/bench_rle.py). numba is imported on first use, not with this module (that takes
~0.5 s with the kernels cached); servers call :func:`warmup` at start-up so requests do not.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from backend.errors import InvalidInput

__all__ = ["RleBytes", "decode_rle", "encode_rle", "mask_to_rle", "rle_to_mask", "warmup"]

logger = logging.getLogger(__name__)

RleBytes: TypeAlias = Sequence[int] | npt.NDArray[np.integer[Any]]
"""Brush RLE as Label Studio sends it: a JSON list of byte values (bytes also work)."""

_HEADER_BITS = 32 + 5 + 4 * 4
_HEADER_BYTES = (_HEADER_BITS + 7) // 8
_MAX_WORDS = 2**32 - 1  # the word count is a 32-bit field
_PARAMS_BITS = 5 + 4 * 4  # word size - 1, then four rle sizes - 1


def encode_rle(flat: npt.ArrayLike) -> list[int]:
    """Encode a flat array of 8-bit words (values 0..255) into LS brush RLE bytes.

    ``flat`` is the row-major RGBA buffer of a whole image (length H*W*4). An empty array
    gives a header-only stream (the SDK raises on it instead).
    """
    words = np.asarray(flat)
    if words.ndim != 1:
        raise InvalidInput(f"RLE input must be a flat 1-D word array, got shape {words.shape}")
    if words.dtype != np.uint8:
        if words.size and words.dtype.kind not in "iu":
            raise InvalidInput(f"RLE words must be integers 0..255, got dtype {words.dtype}")
        if words.size and (int(words.min()) < 0 or int(words.max()) > 255):
            raise InvalidInput("RLE words must lie in 0..255 (8-bit words)")
        words = words.astype(np.uint8)  # an empty list arrives as float64
    _check_length(words.size)
    kernels = _kernels()
    out = np.empty(kernels.stream_capacity(words.size), dtype=np.uint8)
    end = kernels.encode_words(np.ascontiguousarray(words), out)
    stream: list[int] = out[:end].tolist()
    return stream


def decode_rle(rle: RleBytes, *, expected_length: int | None = None) -> npt.NDArray[np.uint8]:
    """Decode LS brush RLE bytes into the flat uint8 word array.

    Pass ``expected_length`` (H*W*4 for a brush region) for untrusted input: it is checked
    against the header before any allocation, so a forged word count cannot make us
    allocate gigabytes. Raises :class:`InvalidInput` for anything that is not a well-formed
    stream: not a flat list of 0..255 integers, truncated, runs that do not add up to the
    declared length, word size above 8 bits.
    """
    if expected_length is not None:
        _check_stream_length(rle, expected_length)
    data = _as_bytes(rle)
    if len(data) < _HEADER_BYTES:
        raise InvalidInput(f"RLE is truncated: {len(data)} bytes, the header alone needs {_HEADER_BYTES}")
    head = int.from_bytes(data[:_HEADER_BYTES], "big") >> (_HEADER_BYTES * 8 - _HEADER_BITS)
    num = head >> _PARAMS_BITS
    word_size = ((head >> 16) & 0x1F) + 1
    rle_sizes = (((head >> 12) & 0xF) + 1, ((head >> 8) & 0xF) + 1, ((head >> 4) & 0xF) + 1, (head & 0xF) + 1)
    if expected_length is not None and num != expected_length:
        raise InvalidInput(
            f"RLE holds {num} words but {expected_length} were expected "
            "(a brush RLE must cover the whole image as RGBA: width * height * 4)"
        )
    if word_size > 8:
        raise InvalidInput(f"RLE word size {word_size} bits is not supported (brush masks use 8-bit words)")
    if num == 0:
        return np.zeros(0, dtype=np.uint8)
    most = _most_words(len(data), word_size, rle_sizes)
    if num > most:
        raise InvalidInput(
            f"RLE is corrupt: its header declares {num} words, but {len(data)} bytes can hold at most {most}"
        )
    kernels = _kernels()
    out = np.empty(num, dtype=np.uint8)
    covered = np.zeros(1, dtype=np.int64)
    status = kernels.decode_stream(
        np.frombuffer(data, dtype=np.uint8), word_size, np.asarray(rle_sizes, dtype=np.int64), out, covered
    )
    if status == kernels.DECODE_TRUNCATED:
        raise InvalidInput(f"RLE is truncated: the stream ends after {int(covered[0])} of {num} words")
    if status != kernels.DECODE_OK:
        raise InvalidInput(f"RLE is corrupt: its runs cover {int(covered[0])} words but the header declares {num}")
    return out


def mask_to_rle(mask: npt.ArrayLike) -> list[int]:
    """Encode a 2-D mask as a brush region: RGBA with all four channels 255 where set, else 0.

    Any non-zero value counts as set. The bytes equal the SDK's ``mask2rle`` on the same mask
    scaled to 0/255 (a 0/1 mask would be invisible: the editor draws alpha as opacity).
    """
    pixels = np.asarray(mask)
    if pixels.ndim != 2:
        raise InvalidInput(f"mask must be 2-D (height, width), got shape {pixels.shape}")
    if pixels.size == 0:
        raise InvalidInput(f"mask must not be empty, got shape {pixels.shape}")
    if pixels.dtype.kind not in "biu":
        raise InvalidInput(f"mask must be boolean or integer, got dtype {pixels.dtype}")
    _check_length(pixels.size * 4)
    flat = np.ravel(pixels)  # C-contiguous: a view when the mask is, else a copy
    if flat.dtype.itemsize != 1:
        flat = flat != 0
    kernels = _kernels()
    out = np.empty(kernels.stream_capacity(flat.size), dtype=np.uint8)
    end = kernels.encode_mask(flat.view(np.uint8), out)
    stream: list[int] = out[:end].tolist()
    return stream


def warmup() -> float:
    """Import numba and load (or, on a cold cache, compile) the codec kernels; returns seconds.

    Servers and workers call this at start-up so that the first request does not pay for it:
    about 0.5 s with numba's cache warm, tens of seconds cold (the compiled code is cached
    next to the module, or in numba's user cache dir when that is read-only).
    """
    started = time.perf_counter()
    decode_rle(encode_rle(np.arange(70, dtype=np.uint8) // 4))
    mask_to_rle(np.eye(9, 10, dtype=bool))
    seconds = time.perf_counter() - started
    logger.info("brush RLE kernels ready in %.2f s", seconds)
    return seconds


def rle_to_mask(rle: RleBytes, height: int, width: int, threshold: int = 127) -> npt.NDArray[np.bool_]:
    """Decode a brush region into a (height, width) boolean mask: alpha > ``threshold``.

    The threshold matters because masks painted in the editor have anti-aliased edges.
    """
    for side in (height, width):
        if not isinstance(side, (int, np.integer)) or isinstance(side, bool) or side <= 0:
            raise InvalidInput(f"mask size must be positive integers, got height={height!r} width={width!r}")
    words = decode_rle(rle, expected_length=height * width * 4)
    alpha: npt.NDArray[np.bool_] = words[3::4] > threshold
    return alpha.reshape(height, width)


@functools.cache
def _kernels() -> ModuleType:
    """The numba kernels, imported on first use (importing numba takes a few hundred ms)."""
    from backend.labelstudio import rle_kernels

    return rle_kernels


def _most_words(stream_bytes: int, word_size: int, rle_sizes: tuple[int, int, int, int]) -> int:
    """The most words any stream of ``stream_bytes`` bytes can declare and still be complete.

    A chunk with an ``s``-bit count covers at most ``2**s`` words in ``3 + s + word_size`` bits
    (a repeat; a literal covers fewer per bit), so no stream covers more than the best ratio
    times the bits after the header.
    """
    bits = max(0, stream_bytes * 8 - _HEADER_BITS)
    return max((bits << size) // (3 + size + word_size) for size in rle_sizes)


def _check_stream_length(rle: object, expected_length: int) -> None:
    """Refuse, before copying it, a stream longer than any encoding of ``expected_length`` words.

    The costliest word any encoder can write is a one-word chunk with a 16-bit count and an
    8-bit word: 27 bits. Anything beyond that (plus header and padding) is not a brush RLE.
    """
    try:
        length = len(rle)  # type: ignore[arg-type]
    except TypeError:
        return  # not a sequence: _as_bytes says so
    most = (_HEADER_BITS + 27 * max(0, expected_length) + 7) // 8 + 8
    if length > most:
        raise InvalidInput(f"RLE has {length} bytes, more than any stream of {expected_length} words can have ({most})")


def _check_length(num: int) -> None:
    if num > _MAX_WORDS:
        raise InvalidInput(f"RLE can hold at most {_MAX_WORDS} words, got {num}")


def _as_bytes(rle: RleBytes) -> bytes:
    """Check that ``rle`` is a flat sequence of integers 0..255 and return it as bytes.

    Python bools are integers, so ``True``/``False`` pass as 1/0, as they would through JSON
    schema validators; anything else that is not an integer in 0..255 is refused.
    """
    if isinstance(rle, (bytes, bytearray, memoryview)):
        return bytes(rle)
    if isinstance(rle, (list, tuple)):
        try:  # C-speed: bytes() itself insists on integers 0..255
            return bytes(rle)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"RLE must be a flat list of integers 0..255: {exc}") from exc
    loose: object = rle  # callers hand over decoded JSON: anything may arrive despite the annotation
    if isinstance(loose, str) or not isinstance(loose, (Sequence, np.ndarray)):
        raise InvalidInput(f"RLE must be a list of integers 0..255, got {type(rle).__name__}")
    try:
        arr = np.asarray(rle)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"RLE must be a flat list of integers 0..255: {exc}") from exc
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidInput("RLE must be a flat list of integers 0..255")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise InvalidInput("RLE values must lie in 0..255 (they are bytes)")
    return arr.astype(np.uint8).tobytes()

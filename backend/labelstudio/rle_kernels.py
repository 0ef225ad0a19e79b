"""Numba kernels behind :mod:`backend.labelstudio.rle`: find runs and write the bit stream in one pass.

Private to ``rle``, which imports this module lazily (numba takes a few hundred ms to import)
and documents the format. The numpy encoder it replaces spent its time in ~65 numpy calls of
about 1 us each on a smooth 512x512 mask, a handful of runs; here the whole stream comes from
one compiled call. Runs are found 64 pixels (one cache line) at a time: eight 64-bit words
that all continue the current run (no set byte, or no zero byte) are skipped with one branch;
otherwise each word is tested the same way, and only a word holding an edge is walked byte by
byte. A smooth mask thus costs about one branch per 64 pixels.

``cache=True`` stores the machine code in ``__pycache__`` (or numba's user cache dir when that
is read-only), so a fresh process loads it instead of compiling for seconds. The explicit
signature makes numba compile (or load) at import, and it takes read-only inputs: a writable
array converts to that type for free, whereas a read-only one passed to a lazily typed kernel
would be a new type and cost a compile on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types

# A writable input converts to the read-only type for free, so one signature serves both.
_SIGNATURE = types.int64(types.Array(types.uint8, 1, "C", readonly=True), types.Array(types.uint8, 1, "C"))

_PARAMS_CODE = (7 << 16) | (2 << 12) | (3 << 8) | (7 << 4) | 15  # word size 8, rle sizes 3, 4, 8, 16
_PARAMS_BITS = 21
_FULL_CHUNK_CODE = (0b111 << 24) | (0xFFFF << 8)  # a 65536-word repeat, word to be OR-ed in
_ONES = np.uint64(0x0101_0101_0101_0101)
_HIGHS = np.uint64(0x8080_8080_8080_8080)
_ZERO = np.uint64(0)
_BITS_PER_WORD = 14  # the most a word (or a pixel: 4 words) can cost: a 1-word literal


def stream_capacity(units: int) -> int:
    """Bytes that always hold the stream of ``units`` words (``encode_words``) or pixels (``encode_mask``).

    A run costs at most 14 bits per word (a one-word literal chunk; a pixel run of one is a
    4-word 14-bit chunk), plus the 53-bit header and up to 8 padding bits.
    """
    return (53 + _BITS_PER_WORD * units + 8 + 7) // 8


@njit(inline="always")
def _put(out: Any, pos: Any, acc: Any, fill: Any, code: Any, width: Any) -> Any:
    """Append the low ``width`` (<= 32) bits of ``code`` MSB first; full bytes go to ``out``.

    ``acc`` keeps the ``fill`` (< 8) pending bits in its low end; higher bits are stale and
    never read, so int64 wrap-around on the shift is harmless.
    """
    acc = (acc << width) | code
    fill += width
    while fill >= 8:
        fill -= 8
        out[pos] = (acc >> fill) & 0xFF
        pos += 1
    return pos, acc, fill


@njit(inline="always")
def _put_run(out: Any, pos: Any, acc: Any, fill: Any, word: Any, length: Any) -> Any:
    """Append the chunks the SDK writes for ``length`` (>= 1) copies of the 8-bit ``word``.

    A run of one is a literal chunk; 2..8, 9..16, 17..256 words use the 3-, 4- and 8-bit
    count; longer runs use 16-bit chunks: full 65536-word ones, then the remainder, even if
    it is a single word.
    """
    n = length - 1
    if n == 0:
        return _put(out, pos, acc, fill, word, 14)
    if n < 8:
        return _put(out, pos, acc, fill, (0b100 << 11) | (n << 8) | word, 14)
    if n < 16:
        return _put(out, pos, acc, fill, (0b101 << 12) | (n << 8) | word, 15)
    if n < 256:
        return _put(out, pos, acc, fill, (0b110 << 16) | (n << 8) | word, 19)
    for _ in range(n >> 16):
        pos, acc, fill = _put(out, pos, acc, fill, _FULL_CHUNK_CODE | word, 27)
    return _put(out, pos, acc, fill, (0b111 << 24) | ((n & 0xFFFF) << 8) | word, 27)


@njit(inline="always")
def _start(out: Any, num: Any) -> Any:
    pos, acc, fill = _put(out, 0, 0, 0, num, 32)
    return _put(out, pos, acc, fill, _PARAMS_CODE, _PARAMS_BITS)


@njit(inline="always")
def _finish(out: Any, pos: Any, acc: Any, fill: Any) -> Any:
    """Pad with 1..8 zero bits, like the SDK (a byte-aligned stream gets a whole zero byte)."""
    pos, acc, fill = _put(out, pos, acc, fill, 0, 8 - fill)
    return pos


@njit(inline="always")
def _zero_bytes(block: Any) -> Any:
    """Non-zero exactly when some byte of the 64-bit ``block`` is zero (the classic bit trick)."""
    return (block - _ONES) & ~block & _HIGHS


@njit(inline="always")
def _continues(block: Any, state: Any) -> Any:
    """Whether all 8 pixels of ``block`` have ``state`` (all non-zero when set, all zero when not)."""
    return _zero_bytes(block) == _ZERO if state else block == _ZERO


@njit(_SIGNATURE, cache=True, nogil=True)
def encode_mask(flat: Any, out: Any) -> Any:
    """Write the stream of a brush region into ``out``; returns the number of bytes written.

    ``flat`` is the row-major mask, one byte per pixel, non-zero = set (RGBA 255, else 0);
    it must not be empty. ``out`` needs ``stream_capacity(flat.size)`` bytes.
    """
    size = flat.size
    pos, acc, fill = _start(out, 4 * size)
    state = flat[0] != 0
    begin = 0  # first pixel of the current run
    whole = size - size % 64
    lines = flat[:whole].view(np.uint64).reshape(-1, 8)  # 64 pixels = one cache line per row
    for line in range(lines.shape[0]):
        b = lines[line]
        # Written out so that LLVM keeps it branch-free: one test per 64 pixels.
        if state:
            zeros = _zero_bytes(b[0]) | _zero_bytes(b[1]) | _zero_bytes(b[2]) | _zero_bytes(b[3])
            if (zeros | _zero_bytes(b[4]) | _zero_bytes(b[5]) | _zero_bytes(b[6]) | _zero_bytes(b[7])) == _ZERO:
                continue
        elif (b[0] | b[1] | b[2] | b[3] | b[4] | b[5] | b[6] | b[7]) == _ZERO:
            continue
        for block in range(8):
            if _continues(b[block], state):
                continue
            first = 64 * line + 8 * block
            for at in range(first, first + 8):
                if (flat[at] != 0) != state:
                    pos, acc, fill = _put_run(out, pos, acc, fill, 255 if state else 0, 4 * (at - begin))
                    state = not state
                    begin = at
    for at in range(whole, size):
        if (flat[at] != 0) != state:
            pos, acc, fill = _put_run(out, pos, acc, fill, 255 if state else 0, 4 * (at - begin))
            state = not state
            begin = at
    pos, acc, fill = _put_run(out, pos, acc, fill, 255 if state else 0, 4 * (size - begin))
    return _finish(out, pos, acc, fill)


@njit(_SIGNATURE, cache=True, nogil=True)
def encode_words(words: Any, out: Any) -> Any:
    """Write the stream of 8-bit ``words`` into ``out``; returns the number of bytes written.

    ``out`` needs ``stream_capacity(words.size)`` bytes. An empty ``words`` gives the header.
    """
    size = words.size
    pos, acc, fill = _start(out, size)
    if size == 0:
        return _finish(out, pos, acc, fill)
    word = words[0]
    begin = 0
    whole = size - size % 8
    blocks = words[:whole].view(np.uint64)
    for block in range(blocks.size):
        if blocks[block] == np.uint64(word) * _ONES:  # 8 more copies of the current word
            continue
        for at in range(8 * block, 8 * block + 8):
            if words[at] != word:
                pos, acc, fill = _put_run(out, pos, acc, fill, np.int64(word), at - begin)
                word = words[at]
                begin = at
    for at in range(whole, size):
        if words[at] != word:
            pos, acc, fill = _put_run(out, pos, acc, fill, np.int64(word), at - begin)
            word = words[at]
            begin = at
    pos, acc, fill = _put_run(out, pos, acc, fill, np.int64(word), size - begin)
    return _finish(out, pos, acc, fill)


# -- decoding ----------------------------------------------------------------------------------

DECODE_OK, DECODE_TRUNCATED, DECODE_OVERRUN = 0, 1, 2

_DECODE_SIGNATURE = types.int64(
    types.Array(types.uint8, 1, "C", readonly=True),  # the whole stream, header included
    types.int64,  # word size in bits, 1..8
    types.Array(types.int64, 1, "C", readonly=True),  # the four rle sizes, 1..16 bits
    types.Array(types.uint8, 1, "C"),  # out: exactly the header's word count
    types.Array(types.int64, 1, "C"),  # info[0]: words the runs cover when decoding stopped
)


@njit(inline="always")
def _read(data: Any, pos: Any, width: Any) -> Any:
    """The ``width`` (1..16) bits at bit offset ``pos``, MSB first; the caller checked the bounds."""
    first = pos >> 3
    last = (pos + width - 1) >> 3
    acc = np.int64(0)
    for at in range(first, last + 1):
        acc = (acc << 8) | np.int64(data[at])
    return (acc >> ((last + 1) * 8 - pos - width)) & ((np.int64(1) << width) - 1)


@njit(_DECODE_SIGNATURE, cache=True, nogil=True)
def decode_stream(data: Any, word_size: Any, rle_sizes: Any, out: Any, info: Any) -> Any:
    """Expand the chunks after the 53-bit header into ``out`` (whose size is the word count N).

    Returns ``DECODE_OK`` when the runs cover exactly N words (bits after that are padding),
    ``DECODE_TRUNCATED`` when a chunk runs past the end of ``data``, ``DECODE_OVERRUN`` when
    a chunk would write past N; ``info[0]`` gets the words covered (including that chunk).
    One pass, no memory beyond ``out``: a forged stream costs its length, never more.
    """
    num = out.size
    total_bits = data.size * 8
    pos = 53
    done = 0
    while done < num:
        if pos + 3 > total_bits:
            info[0] = done
            return DECODE_TRUNCATED
        flag = _read(data, pos, 1)
        size = rle_sizes[_read(data, pos + 1, 2)]
        pos += 3
        if pos + size > total_bits:
            info[0] = done
            return DECODE_TRUNCATED
        count = _read(data, pos, size) + 1
        pos += size
        payload = word_size if flag else count * word_size
        if pos + payload > total_bits:
            info[0] = done
            return DECODE_TRUNCATED
        if done + count > num:
            info[0] = done + count
            return DECODE_OVERRUN
        if flag:
            out[done : done + count] = _read(data, pos, word_size)
        elif word_size == 8 and pos & 7 == 0:
            start = pos >> 3
            out[done : done + count] = data[start : start + count]
        else:
            for k in range(count):
                out[done + k] = _read(data, pos + k * word_size, word_size)
        pos += payload
        done += count
    info[0] = done
    return DECODE_OK

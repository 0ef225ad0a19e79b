"""The checks behind the fuzz targets, shared with the corpus replay (tests/adversarial/test_fuzz_corpus.py).

Each ``check_*`` function takes one fuzz input (bytes) and returns a short outcome name when
the code under test behaved acceptably; anything else escapes as an exception, which is a
finding (atheris reports it with a reproducer; the replay test fails on it). No atheris here:
the replay runs in ``make test`` without it.

Acceptable outcomes:

* image readers (``backend.imaging.io.read_image_bytes``, and ``decode_png_bytes`` for PNG):
  a non-empty list of uint8 2-D frames within the limits below, or a ``SonosegError`` subclass;
* brush RLE (``backend.labelstudio.rle``): a mask of exactly the declared (height, width), or
  ``InvalidInput``; when a stream decodes, re-encoding its mask decodes to the same mask.
"""

from __future__ import annotations

import struct

import numpy as np

from backend.errors import InvalidInput, SonosegError
from backend.imaging.io import decode_png_bytes, read_image_bytes
from backend.labelstudio.rle import decode_rle, mask_to_rle, rle_to_mask

# Small limits, so that a decompression bomb is refused in microseconds and the fuzzer stays fast.
MAX_SIDE = 512
MAX_BYTES = 1024 * 1024
MAX_DECODED_BYTES = 8 * 1024 * 1024
MAX_RLE_SIDE = 64
MAX_UNCHECKED_WORDS = 1 << 22


class Finding(AssertionError):
    """The code under test answered, but wrongly (bad shape, type, or inconsistency)."""


def check_image(data: bytes) -> str:
    """Read ``data`` as an uploaded image; returns "frames" or the SonosegError class name."""
    try:
        frames = read_image_bytes(
            data, "fuzz-input", max_side=MAX_SIDE, max_bytes=MAX_BYTES, max_decoded_bytes=MAX_DECODED_BYTES
        )
    except SonosegError as exc:
        _check_message(exc)
        outcome = type(exc).__name__
    else:
        _check_frames(frames)
        outcome = "frames"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        try:
            pixels = decode_png_bytes(data, max_side=MAX_SIDE, max_bytes=MAX_BYTES, max_decoded_bytes=MAX_DECODED_BYTES)
        except SonosegError as exc:
            _check_message(exc)
        else:
            if pixels.ndim not in (2, 3) or pixels.size == 0 or max(pixels.shape[:2]) > MAX_SIDE:
                raise Finding(f"decode_png_bytes returned {pixels.dtype} {pixels.shape}")
    return outcome


def _check_frames(frames: object) -> None:
    if not isinstance(frames, list) or not frames:
        raise Finding(f"read_image_bytes returned {type(frames).__name__} {frames!r:.80}, not a list of frames")
    for k, frame in enumerate(frames):
        pixels = frame.pixels
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise Finding(
                f"frame {k}: pixels are {type(pixels).__name__} {getattr(pixels, 'dtype', '')} "
                f"{getattr(pixels, 'shape', '')}, not uint8 (H, W)"
            )
        if pixels.size == 0 or max(pixels.shape) > MAX_SIDE:
            raise Finding(f"frame {k}: shape {pixels.shape} is empty or beyond the {MAX_SIDE}-pixel limit")
        if frame.frame_index != k:
            raise Finding(f"frame {k} says it is frame {frame.frame_index}")
        spacing = frame.geometry.spacing
        if spacing is not None and (len(spacing) != 2 or not all(isinstance(v, float) for v in spacing)):
            raise Finding(f"frame {k}: spacing {spacing!r} is not two floats")
        if not all(isinstance(key, str) and isinstance(value, str) for key, value in frame.metadata.items()):
            raise Finding(f"frame {k}: metadata is not str -> str")


def _check_message(exc: SonosegError) -> None:
    if not isinstance(exc.message, str) or not exc.message:
        raise Finding(f"{type(exc).__name__} without a message")


def rle_case(data: bytes) -> tuple[list[int], int, int]:
    """Fuzz bytes -> (integer list, height, width).

    Byte 0 is a mode: bit 0 picks how the rest becomes integers: 0 -> one byte each (a
    well-typed list), 1 -> big-endian int16 pairs (negatives and values above 255 too); bit 1
    set overwrites the stream's 32-bit word count with height * width * 4, so that the fuzzer
    gets past the size check into the chunk walk without having to guess the product. Bytes
    1-2 give the height and width (1..64); the rest is the stream.
    """
    if len(data) < 3:
        return list(data), 1, 1
    mode, height, width, body = data[0], data[1] % MAX_RLE_SIDE + 1, data[2] % MAX_RLE_SIDE + 1, data[3:]
    if mode & 2:
        body = (height * width * 4).to_bytes(4, "big") + body[4:]
    if mode & 1 == 0:
        return list(body), height, width
    body = body[: len(body) - len(body) % 2]
    return [v for (v,) in struct.iter_unpack(">h", body)], height, width


def check_rle(data: bytes) -> str:
    """Decode a fuzzed brush region; returns "mask" or "InvalidInput"."""
    rle, height, width = rle_case(data)
    try:
        mask = rle_to_mask(rle, height, width)
    except InvalidInput as exc:
        _check_message(exc)
        outcome = "InvalidInput"
    else:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (height, width):
            raise Finding(f"rle_to_mask returned {type(mask).__name__} {getattr(mask, 'shape', '')}")
        again = rle_to_mask(mask_to_rle(mask), height, width)
        if not np.array_equal(again, mask):
            raise Finding("re-encoding a decoded mask does not decode to the same mask")
        outcome = "mask"
    # Without expected_length (the trusted-caller API) a complete stream may legitimately hold
    # ~26 Ki words per byte; decode it only when its header claims a modest size.
    declared = int.from_bytes(bytes(v & 0xFF for v in rle[:4]), "big")
    if declared <= MAX_UNCHECKED_WORDS:
        try:
            words = decode_rle(rle)
        except InvalidInput as exc:
            _check_message(exc)
        else:
            if words.dtype != np.uint8 or words.shape != (declared,):
                raise Finding(f"decode_rle returned {words.dtype} {words.shape}, the header declares {declared} words")
    return outcome


def rle_input(stream: list[int], height: int, width: int) -> bytes:
    """The fuzz input that ``rle_case`` turns into (stream, height, width), for seeds and tests."""
    if not (1 <= height <= MAX_RLE_SIDE and 1 <= width <= MAX_RLE_SIDE):
        raise ValueError("height and width must be 1..64")
    if all(0 <= v <= 255 for v in stream):
        return bytes([0, height - 1, width - 1, *stream])
    return bytes([1, height - 1, width - 1]) + struct.pack(f">{len(stream)}h", *stream)

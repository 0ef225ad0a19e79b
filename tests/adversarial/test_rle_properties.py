"""Property-based tests of the brush RLE codec (backend.labelstudio.rle).

The oracle tests (tests/test_rle.py) pin the codec byte for byte against the Label Studio SDK;
here hypothesis generates masks, word arrays and hostile streams. The contract under test:

* ``decode(encode(x)) == x`` for any mask and any 8-bit word array, and any stream a thi.ng
  encoder may write (word sizes 1..8, rle sizes 1..16, literal chunks of many words);
* anything else (wrong lengths, values outside 0..255, non-integers, truncated or forged
  headers) either decodes to the right shape or raises ``InvalidInput`` with a message:
  never another exception, never more than a bounded time, never an allocation sized by a
  forged header instead of by the input.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from backend.errors import InvalidInput
from backend.labelstudio.rle import decode_rle, encode_rle, mask_to_rle, rle_to_mask, warmup

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

PROPERTY = settings(
    max_examples=150,
    deadline=None,  # time is asserted explicitly, generously, so a loaded CI box does not flake
    database=None,  # no .hypothesis/ directory in the work tree
    derandomize=True,  # the same examples on every run: a permanent suite, not a lottery
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SECONDS = 2.0  # any single decode of the small inputs generated here
HEADER_BITS = 53


@pytest.fixture(scope="module", autouse=True)
def _kernels_loaded() -> None:
    warmup()  # numba import + kernel load must not count against the first example's time


def bounded(call: Callable[[], Any], *, max_bytes: int) -> Any:
    """Run ``call``; its result, or the InvalidInput it raised. Fails on time or memory excess."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        try:
            result: Any = call()
        except InvalidInput as exc:
            assert exc.message and isinstance(exc.message, str)
            result = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    assert elapsed < SECONDS, f"took {elapsed:.2f} s"
    assert peak <= max_bytes, f"allocated {peak} bytes (bound {max_bytes})"
    return result


def pack_bits(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8 or 8)  # like the SDK: 1..8 zero bits of padding
    return [int(bits[k : k + 8], 2) for k in range(0, len(bits), 8)]


def header_bits(num: int, word_size: int, rle_sizes: Sequence[int]) -> str:
    return f"{num:032b}{word_size - 1:05b}" + "".join(f"{size - 1:04b}" for size in rle_sizes)


@st.composite
def thing_streams(draw: st.DrawFn) -> tuple[list[int], npt.NDArray[np.uint8]]:
    """A stream as any thi.ng encoder may write it, and the words it holds.

    Chunks are drawn directly (repeat or literal, any size index whose count field fits), so
    the split into chunks is arbitrary, not the SDK's.
    """
    word_size = draw(st.integers(1, 8))
    rle_sizes = draw(st.lists(st.integers(1, 16), min_size=4, max_size=4))
    top = (1 << word_size) - 1
    bits: list[str] = []
    words: list[int] = []
    for _ in range(draw(st.integers(0, 25))):
        k = draw(st.integers(0, 3))
        size = rle_sizes[k]
        count = draw(st.integers(1, min(2**size, 300)))
        if draw(st.booleans()):
            word = draw(st.integers(0, top))
            bits.append(f"1{k:02b}{count - 1:0{size}b}{word:0{word_size}b}")
            words += [word] * count
        else:
            literal = draw(st.lists(st.integers(0, top), min_size=count, max_size=count))
            bits.append(f"0{k:02b}{count - 1:0{size}b}" + "".join(f"{w:0{word_size}b}" for w in literal))
            words += literal
    stream = pack_bits(header_bits(len(words), word_size, rle_sizes) + "".join(bits))
    return stream, np.asarray(words, dtype=np.uint8)


masks = st.tuples(st.integers(1, 48), st.integers(1, 48)).flatmap(
    lambda shape: st.one_of(
        hnp.arrays(np.bool_, shape),
        hnp.arrays(np.uint8, shape, elements=st.sampled_from([0, 0, 1, 128, 255])),
        # blocky masks: long runs, the shape a painted nerve has
        st.tuples(*(st.integers(0, side) for side in shape * 2)).map(
            lambda box, shape=shape: np.pad(
                np.ones((max(box[2] - box[0], 0), max(box[3] - box[1], 0)), bool),
                (
                    (min(box[0], box[2]), shape[0] - max(box[2] - box[0], 0) - min(box[0], box[2])),
                    (min(box[1], box[3]), shape[1] - max(box[3] - box[1], 0) - min(box[1], box[3])),
                ),
            )
        ),
    )
)

word_arrays = st.lists(st.tuples(st.integers(0, 255), st.integers(1, 70_000)), max_size=12).map(
    lambda runs: np.repeat(
        np.asarray([v for v, _ in runs], dtype=np.uint8), np.asarray([n for _, n in runs], dtype=np.int64)
    )
)

junk_items = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(0, 255),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.lists(st.integers(0, 255), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)

sizes = st.tuples(st.integers(1, 24), st.integers(1, 24))


# -- round trips ------------------------------------------------------------------------------


@PROPERTY
@given(masks)
def test_mask_round_trips(mask: npt.NDArray[Any]) -> None:
    height, width = mask.shape
    stream = mask_to_rle(mask)
    assert all(type(b) is int and 0 <= b <= 255 for b in stream)
    assert np.array_equal(rle_to_mask(stream, height, width), mask != 0)


@PROPERTY
@given(word_arrays)
def test_words_round_trip(words: npt.NDArray[np.uint8]) -> None:
    assert np.array_equal(decode_rle(encode_rle(words)), words)
    assert np.array_equal(decode_rle(encode_rle(words), expected_length=words.size), words)


@PROPERTY
@given(thing_streams())
def test_any_thing_encoder_stream_decodes(case: tuple[list[int], npt.NDArray[np.uint8]]) -> None:
    stream, words = case
    assert np.array_equal(decode_rle(stream, expected_length=words.size), words)
    assert np.array_equal(decode_rle(bytes(stream)), words)


# -- hostile input: right shape or InvalidInput, bounded ---------------------------------------


def check_mask_or_invalid(rle: object, height: int, width: int, *, max_bytes: int) -> None:
    outcome = bounded(lambda: rle_to_mask(rle, height, width), max_bytes=max_bytes)  # type: ignore[arg-type]
    if not isinstance(outcome, InvalidInput):
        assert outcome.shape == (height, width) and outcome.dtype == np.bool_


@PROPERTY
@given(st.lists(junk_items, max_size=64), sizes)
def test_arbitrary_lists_decode_or_raise_invalid_input(rle: list[Any], size: tuple[int, int]) -> None:
    check_mask_or_invalid(rle, *size, max_bytes=1 << 20)


@PROPERTY
@given(st.lists(st.integers(-(2**65), 2**65), max_size=64) | st.lists(st.integers(0, 255), max_size=400), sizes)
def test_arbitrary_integer_lists_decode_or_raise_invalid_input(rle: list[int], size: tuple[int, int]) -> None:
    check_mask_or_invalid(rle, *size, max_bytes=1 << 20)
    check_mask_or_invalid(np.asarray(rle, dtype=object), *size, max_bytes=1 << 20)


@PROPERTY
@given(st.binary(max_size=600), sizes)
def test_arbitrary_bytes_decode_or_raise_invalid_input(data: bytes, size: tuple[int, int]) -> None:
    check_mask_or_invalid(data, *size, max_bytes=1 << 20)
    check_mask_or_invalid(bytearray(data), *size, max_bytes=1 << 20)


@PROPERTY
@given(
    st.one_of(
        junk_items,
        st.text(),
        hnp.arrays(
            st.sampled_from([np.float64, np.int64, np.int8, np.uint16, np.bool_, np.complex64]),
            hnp.array_shapes(max_dims=3, max_side=8),
        ),
    ),
    sizes,
)
def test_non_list_inputs_raise_invalid_input_or_decode(rle: object, size: tuple[int, int]) -> None:
    check_mask_or_invalid(rle, *size, max_bytes=1 << 20)


@PROPERTY
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 32),
    st.lists(st.integers(1, 16), min_size=4, max_size=4),
    st.binary(max_size=300),
    sizes,
)
def test_forged_headers_never_allocate_what_they_claim(
    num: int, word_size: int, rle_sizes: list[int], tail: bytes, size: tuple[int, int]
) -> None:
    """A header can claim 4 Gi words; memory must follow the input (or the image), not the claim."""
    bits = header_bits(num, word_size, rle_sizes) + "".join(f"{b:08b}" for b in tail)
    stream = pack_bits(bits)
    height, width = size
    check_mask_or_invalid(stream, height, width, max_bytes=1 << 20)
    # Without expected_length (trusted callers): at most what the bytes can encode, ~26 Ki words
    # per byte at best (a 65536-word repeat in 20 bits), never the header's 4 Gi.
    budget = len(stream) * 27_000 + (1 << 20)
    outcome = bounded(lambda: decode_rle(stream), max_bytes=budget)
    if not isinstance(outcome, InvalidInput):
        assert outcome.shape == (num,) and outcome.dtype == np.uint8


@PROPERTY
@given(masks, st.data())
def test_mutated_valid_streams_decode_or_raise_invalid_input(mask: npt.NDArray[Any], data: st.DataObject) -> None:
    height, width = mask.shape
    stream = mask_to_rle(mask)
    mutation = data.draw(st.sampled_from(["truncate", "flip", "insert", "append", "splice_header", "huge"]))
    if mutation == "truncate":
        stream = stream[: data.draw(st.integers(0, len(stream) - 1))]
    elif mutation == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    elif mutation == "insert":
        at = data.draw(st.integers(0, len(stream)))
        stream[at:at] = data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=8))
    elif mutation == "append":
        stream += data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=64))
    elif mutation == "splice_header":  # the header of a differently sized image
        other = mask_to_rle(np.ones((data.draw(st.integers(1, 48)), data.draw(st.integers(1, 48))), bool))
        stream = other[:7] + stream[7:]
    else:  # a value outside 0..255 somewhere
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(
            st.one_of(st.integers(256, 2**64), st.integers(-(2**64), -1))
        )
    check_mask_or_invalid(stream, height, width, max_bytes=1 << 20)


@PROPERTY
@given(
    st.one_of(st.integers(-(2**40), 2**40), st.floats(), st.booleans(), st.none(), st.text(max_size=2)),
    st.one_of(st.integers(-(2**40), 2**40), st.floats(), st.booleans(), st.none(), st.text(max_size=2)),
)
def test_any_declared_size_is_checked_before_decoding(height: Any, width: Any) -> None:
    stream = mask_to_rle(np.ones((4, 5), bool))
    outcome = bounded(lambda: rle_to_mask(stream, height, width), max_bytes=1 << 20)
    if not isinstance(outcome, InvalidInput):
        assert (height, width) == (4, 5) and outcome.all()


# -- pinned regressions (found while writing this suite) ---------------------------------------


def literal_stream(num: int, *, word_size: int = 1, seed: int = 0) -> bytes:
    """Literal chunks of 65536 1-bit words: the stream with most words per byte after repeats."""
    rng = np.random.default_rng(seed)
    parts = [np.frombuffer(header_bits(num, word_size, [16] * 4).encode(), np.uint8) - 48]
    for start in range(0, num, 65536):
        count = min(65536, num - start)
        head = np.frombuffer(f"000{count - 1:016b}".encode(), np.uint8) - 48
        parts += [head, rng.integers(0, 2, count * word_size, dtype=np.uint8)]
    return np.packbits(np.concatenate(parts)).tobytes()


def test_literal_stream_of_1_bit_words_decodes_in_memory_proportional_to_its_output() -> None:
    """The numpy expansion used ~290 bytes of temporaries per input byte here (150 MB for a
    1024x1024 region, 2.4 GB for 4096x4096); the kernel needs the output and nothing more."""
    side = 1024
    stream = list(literal_stream(side * side * 4))
    mask = bounded(lambda: rle_to_mask(stream, side, side), max_bytes=3 * side * side * 4)
    assert mask.shape == (side, side)


def test_a_million_one_word_chunks_decode_fast() -> None:
    num = 1_000_000
    chunk = np.zeros((num, 5), np.uint8)
    chunk[:, 0] = 1  # repeat flag, size index 0 (a 1-bit count of 0: one word), then the word
    chunk[:, 4] = np.arange(num) % 2
    bits = np.concatenate([np.frombuffer(header_bits(num, 1, [1] * 4).encode(), np.uint8) - 48, chunk.ravel()])
    stream = np.packbits(bits).tobytes()
    words = bounded(lambda: decode_rle(stream, expected_length=num), max_bytes=4 * num)
    assert np.array_equal(words, np.arange(num) % 2)


def test_a_header_claiming_more_words_than_its_bytes_can_hold_is_refused_before_allocating() -> None:
    stream = pack_bits(header_bits(2**32 - 1, 1, [16] * 4) + "1" + "11" + "1" * 16 + "0")  # one 65536-word run
    outcome = bounded(lambda: decode_rle(stream), max_bytes=1 << 20)
    assert isinstance(outcome, InvalidInput) and "can hold at most" in outcome.message


def test_a_list_longer_than_any_stream_of_the_image_is_refused_before_copying() -> None:
    outcome = bounded(lambda: rle_to_mask(range(10**12), 4, 4), max_bytes=1 << 20)  # type: ignore[arg-type]
    assert isinstance(outcome, InvalidInput) and "more than any stream" in outcome.message

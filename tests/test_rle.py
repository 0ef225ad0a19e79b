"""Brush RLE codec: byte-for-byte against the Label Studio SDK, round trips, bad input."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from backend.errors import InvalidInput
from backend.labelstudio.rle import decode_rle, encode_rle, mask_to_rle, rle_to_mask

brush = pytest.importorskip("label_studio_sdk.converter.brush")

SHARED_MASKS = Path("/work/shared/data/usgra-seg/masks")  # optional real data; never required


def sdk_mask_rle(mask: npt.NDArray[np.bool_]) -> list[int]:
    """The SDK's encoding of a boolean mask, given as the 0/255 uint8 mask it expects."""
    return list(brush.mask2rle(np.ascontiguousarray(mask, dtype=np.uint8) * np.uint8(255)))


def ragged_ellipse(height: int, width: int, seed: int) -> npt.NDArray[np.bool_]:
    """An ellipse whose edge is roughened by noise, like a hand-painted nerve."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    radius = ((yy - height * 0.45) / (height * 0.2)) ** 2 + ((xx - width * 0.55) / (width * 0.3)) ** 2
    inside: npt.NDArray[np.bool_] = radius + rng.normal(0, 0.15, (height, width)) < 1.0
    return inside


def thing_encode(words: Sequence[int], word_size: int, rle_sizes: Sequence[int]) -> list[int]:
    """A naive, independent thi.ng rle-pack encoder (as the LS editor writes streams).

    Unlike the SDK it groups literal words into one chunk and takes any word/rle sizes, so it
    exercises decoder paths the SDK encoder never produces. Bit strings, clarity over speed.
    """
    bits = [f"{len(words):032b}", f"{word_size - 1:05b}", *(f"{size - 1:04b}" for size in rle_sizes)]
    longest = 2 ** max(rle_sizes)

    def chunk(flag: int, count: int, payload: Sequence[int]) -> None:
        k = next(k for k, size in enumerate(rle_sizes) if count <= 2**size)
        bits.append(f"{flag}{k:02b}{count - 1:0{rle_sizes[k]}b}" + "".join(f"{w:0{word_size}b}" for w in payload))

    i, n = 0, len(words)
    while i < n:
        run = 1
        while i + run < n and words[i + run] == words[i] and run < longest:
            run += 1
        if run > 1:
            chunk(1, run, [words[i]])
            i += run
            continue
        j = i + 1
        while j < n and j - i < longest and not (j + 1 < n and words[j + 1] == words[j]):
            j += 1
        chunk(0, j - i, words[i:j])
        i = j
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[k : k + 8], 2) for k in range(0, len(stream), 8)]


# --- byte-for-byte against the SDK -------------------------------------------------------

ONE_PIXEL = [(0, 0), (0, 4), (2, 0), (2, 4), (1, 2)]


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(np.zeros((1, 1), bool), id="1x1-empty"),
        pytest.param(np.ones((1, 1), bool), id="1x1-full"),
        pytest.param(np.zeros((3, 5), bool), id="3x5-empty"),
        pytest.param(np.ones((3, 5), bool), id="3x5-full"),
        *(
            pytest.param(np.pad(np.ones((1, 1), bool), ((y, 2 - y), (x, 4 - x))), id=f"3x5-pixel-{y}-{x}")
            for y, x in ONE_PIXEL
        ),
        pytest.param(np.zeros((511, 509), bool), id="511x509-empty"),
        pytest.param(np.ones((511, 509), bool), id="511x509-full"),
        pytest.param(ragged_ellipse(511, 509, seed=1), id="511x509-ragged-ellipse"),
        pytest.param(ragged_ellipse(512, 512, seed=2), id="512x512-ragged-ellipse"),
        pytest.param(np.random.default_rng(3).random((37, 53)) < 0.5, id="37x53-noise"),
        pytest.param(np.random.default_rng(4).random((64, 64)) < 0.05, id="64x64-sparse-noise"),
        pytest.param(np.random.default_rng(5).random((64, 64)) < 0.95, id="64x64-dense-noise"),
        pytest.param(np.eye(300, 301, dtype=bool), id="300x301-diagonal"),
    ],
)
def test_mask_to_rle_matches_sdk(mask: npt.NDArray[np.bool_]) -> None:
    expected = sdk_mask_rle(mask)
    assert mask_to_rle(mask) == expected
    assert mask_to_rle(mask.astype(np.uint8) * 255) == expected
    assert mask_to_rle(mask.astype(np.int32) * 7) == expected  # any non-zero value is "set"


def real_masks(limit: int) -> list[npt.NDArray[np.uint8]]:
    if not SHARED_MASKS.is_dir():
        return []
    image = pytest.importorskip("PIL.Image")
    return [np.array(image.open(path)) for path in sorted(SHARED_MASKS.glob("*.png"))[:limit]]


def test_mask_to_rle_matches_sdk_on_real_masks() -> None:
    masks = real_masks(limit=12) or [ragged_ellipse(512, 512, seed=s).astype(np.uint8) for s in range(3)]
    checked = 0
    for palette in masks:
        for klass in (1, 2):
            region = palette == klass
            if region.any():
                assert mask_to_rle(region) == sdk_mask_rle(region)
                checked += 1
    assert checked >= 3


@pytest.mark.parametrize(
    "length", [1, 2, 7, 8, 9, 16, 17, 255, 256, 257, 300, 65535, 65536, 65537, 65536 * 2, 65536 * 2 + 1, 300_001]
)
def test_encode_rle_matches_sdk_at_chunk_boundaries(length: int) -> None:
    for value in (0, 255, 7):
        words = np.full(length, value, dtype=np.uint8)
        assert encode_rle(words) == list(brush.encode_rle(words))
        assert np.array_equal(decode_rle(encode_rle(words)), words)


def test_encode_rle_pads_a_byte_aligned_stream_with_a_zero_byte_like_the_sdk() -> None:
    # header 53 bits + one 27-bit chunk = 80 bits: the SDK still appends eight zero bits
    words = np.zeros(300, dtype=np.uint8)
    assert encode_rle(words) == list(brush.encode_rle(words))
    assert len(encode_rle(words)) == 11 and encode_rle(words)[-1] == 0


def test_encode_rle_matches_sdk_on_seeded_random_runs() -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        runs = int(rng.integers(1, 400))
        values = rng.integers(0, 256, runs)
        lengths = rng.choice([1, 1, 2, 3, 8, 9, 16, 17, 200, 256, 257, 5000], runs)
        words = np.repeat(values, lengths).astype(np.uint8)
        assert encode_rle(words) == list(brush.encode_rle(words))


def test_decode_rle_matches_sdk_decoder() -> None:
    rng = np.random.default_rng(12)
    for _ in range(20):
        words = np.repeat(rng.integers(0, 256, 300), rng.integers(1, 40, 300)).astype(np.uint8)
        stream = encode_rle(words)
        assert np.array_equal(decode_rle(stream), brush.decode_rle(stream))
        assert np.array_equal(decode_rle(stream), words)


@pytest.mark.parametrize(
    ("word_size", "rle_sizes"), [(8, [3, 4, 8, 16]), (8, [1, 2, 5, 9]), (3, [2, 3, 4, 6]), (1, [1, 1, 1, 1])]
)
def test_decode_rle_reads_editor_style_streams(word_size: int, rle_sizes: list[int]) -> None:
    """Literal chunks of many words, other word and rle sizes: what the LS editor may send."""
    rng = np.random.default_rng(word_size * 100 + sum(rle_sizes))
    top = 2**word_size
    repeats = [1, 1, 1, 2, 5, 40, 700] if max(rle_sizes) >= 8 else [1, 1, 1, 2, 3, 5]  # keep the SDK quick
    for _ in range(15):
        words = np.repeat(rng.integers(0, top, 200), rng.choice(repeats, 200)).astype(np.uint8)
        stream = thing_encode(words.tolist(), word_size, rle_sizes)
        assert np.array_equal(decode_rle(stream), words)
        assert np.array_equal(brush.decode_rle(stream), words)  # the reference encoder is right


# --- round trips --------------------------------------------------------------------------


def test_mask_round_trip_on_seeded_random_masks() -> None:
    rng = np.random.default_rng(21)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 90, 2))
        kind = rng.integers(3)
        if kind == 0:
            mask = rng.random((height, width)) < rng.random()
        elif kind == 1:
            mask = ragged_ellipse(height, width, seed=int(rng.integers(1 << 30)))
        else:
            mask = np.zeros((height, width), bool)
            mask[rng.integers(height) :, rng.integers(width) :] = True
        stream = mask_to_rle(mask)
        assert np.array_equal(rle_to_mask(stream, height, width), mask)
        assert np.array_equal(decode_rle(stream), np.repeat(mask.ravel().astype(np.uint8) * 255, 4))


def test_non_contiguous_masks_encode_like_their_copy() -> None:
    mask = ragged_ellipse(120, 90, seed=7)
    for view in (mask.T, mask[::2, 1::3], mask[::-1]):
        assert mask_to_rle(view) == mask_to_rle(np.ascontiguousarray(view))


def test_rle_to_mask_thresholds_alpha() -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[0, 2, 3], rgba[1, 0, 3] = 127, 128, 255, 1
    stream = encode_rle(rgba.ravel())
    assert rle_to_mask(stream, 2, 3).tolist() == [[False, True, True], [False, False, False]]
    assert rle_to_mask(stream, 2, 3, threshold=0).tolist() == [[True, True, True], [True, False, False]]


def test_empty_word_array_round_trips() -> None:
    stream = encode_rle(np.zeros(0, dtype=np.uint8))
    assert decode_rle(stream).size == 0


def test_decode_accepts_bytes_tuples_and_arrays() -> None:
    stream = mask_to_rle(ragged_ellipse(20, 30, seed=3))
    expected = decode_rle(stream)
    for form in (bytes(stream), tuple(stream), np.array(stream, dtype=np.int64), np.array(stream, dtype=np.uint8)):
        assert np.array_equal(decode_rle(form), expected)


# --- bad input ----------------------------------------------------------------------------


VALID = mask_to_rle(ragged_ellipse(16, 16, seed=9))


@pytest.mark.parametrize(
    "rle",
    [
        pytest.param([], id="empty"),
        pytest.param(VALID[:5], id="shorter-than-header"),
        pytest.param(VALID[:7], id="header-only"),
        pytest.param(VALID[: len(VALID) // 2], id="truncated-half"),
        pytest.param(VALID[:-2], id="truncated-tail"),
        pytest.param([*VALID[:-1], 256], id="value-256"),
        pytest.param([-1, *VALID[1:]], id="negative"),
        pytest.param([float(v) for v in VALID], id="floats"),
        pytest.param([*VALID[:-1], None], id="none-inside"),
        pytest.param([*VALID[:-1], "0"], id="string-inside"),
        pytest.param([VALID, VALID], id="nested"),
        pytest.param([[1, 2], [3]], id="ragged-nested"),
        pytest.param([2**70] * 10, id="huge-ints"),
        pytest.param("0,29,76", id="string"),
        pytest.param({"rle": VALID}, id="dict"),
        pytest.param(None, id="none"),
        pytest.param(42, id="int"),
    ],
)
def test_malformed_rle_raises_invalid_input(rle: object) -> None:
    with pytest.raises(InvalidInput):
        rle_to_mask(rle, 16, 16)  # type: ignore[arg-type]


def test_wrong_length_for_the_image_raises_before_decoding() -> None:
    with pytest.raises(InvalidInput, match="1024 words but 1088 were expected"):
        rle_to_mask(VALID, 16, 17)
    forged = [0xFF, 0xFF, 0xFF, 0xFF, *VALID[4:]]  # claims 4 Gi words
    with pytest.raises(InvalidInput, match="were expected"):
        rle_to_mask(forged, 16, 16)


def test_word_size_above_8_bits_is_refused() -> None:
    stream = thing_encode([1, 2, 3, 3, 3], word_size=12, rle_sizes=[3, 4, 8, 16])
    with pytest.raises(InvalidInput, match="word size"):
        decode_rle(stream)


def test_runs_overrunning_the_declared_length_are_refused() -> None:
    stream = thing_encode([5] * 10, word_size=8, rle_sizes=[3, 4, 8, 16])
    shrunk = [0, 0, 0, 9, *stream[4:]]  # header now declares 9 words, the run still covers 10
    with pytest.raises(InvalidInput, match="cover 10 words"):
        decode_rle(shrunk)


def test_mutated_streams_raise_invalid_input_or_decode_to_the_right_size() -> None:
    """Seeded fuzzing: corruption must never surface as IndexError/ValueError/etc."""
    rng = np.random.default_rng(31)
    base = mask_to_rle(rng.random((12, 10)) < 0.3)
    for _ in range(400):
        stream = list(base)
        action = rng.integers(3)
        if action == 0:
            stream = stream[: int(rng.integers(len(stream)))]
        elif action == 1:
            for _ in range(int(rng.integers(1, 4))):
                stream[int(rng.integers(len(stream)))] = int(rng.integers(256))
        else:
            stream = [*stream[:7], *rng.integers(0, 256, int(rng.integers(0, 40))).tolist()]
        try:
            mask = rle_to_mask(stream, 12, 10)
        except InvalidInput:
            continue
        assert mask.shape == (12, 10)


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(np.zeros((2, 2, 4), np.uint8), id="3-d"),
        pytest.param(np.zeros(5, np.uint8), id="1-d"),
        pytest.param(np.zeros((0, 4), np.uint8), id="empty"),
        pytest.param(np.zeros((2, 2), np.float32), id="float"),
    ],
)
def test_mask_to_rle_rejects_bad_masks(mask: npt.NDArray[np.generic]) -> None:
    with pytest.raises(InvalidInput):
        mask_to_rle(mask)


@pytest.mark.parametrize(
    "words",
    [
        pytest.param(np.zeros((2, 4), np.uint8), id="2-d"),
        pytest.param(np.array([0, 256]), id="above-255"),
        pytest.param(np.array([-1, 0]), id="negative"),
        pytest.param(np.array([0.5, 1.0]), id="float"),
    ],
)
def test_encode_rle_rejects_bad_words(words: npt.NDArray[np.generic]) -> None:
    with pytest.raises(InvalidInput):
        encode_rle(words)


@pytest.mark.parametrize(("height", "width"), [(0, 4), (4, -1), (2.0, 8), (True, 8)])
def test_rle_to_mask_rejects_bad_sizes(height: object, width: object) -> None:
    with pytest.raises(InvalidInput):
        rle_to_mask(VALID, height, width)  # type: ignore[arg-type]


# --- the numba kernels -------------------------------------------------------------------

EDGES = [0, 1, 7, 8, 9, 63, 64, 65, 71, 72, 127, 128, 129, 149, 150]


def test_runs_starting_and_ending_around_word_and_line_boundaries_match_sdk() -> None:
    """The kernel skips 8- and 64-pixel blocks: put edges on, before and after their borders."""
    for start in EDGES:
        for stop in EDGES:
            if start < stop:
                for shape in ((1, 150), (2, 75)):
                    line = np.zeros(150, bool)
                    line[start:stop] = True
                    mask = line.reshape(shape)
                    assert mask_to_rle(mask) == sdk_mask_rle(mask), (start, stop, shape)
                    assert mask_to_rle(~mask) == sdk_mask_rle(~mask), (start, stop, shape)


def test_any_non_zero_byte_counts_as_set() -> None:
    """The kernel tests 8 bytes at once for "no zero byte": values 1, 0x7F, 0x80, 0xFF, -1..."""
    rng = np.random.default_rng(41)
    mask = ragged_ellipse(70, 90, seed=41)
    values = rng.integers(1, 256, mask.shape)
    expected = sdk_mask_rle(mask)
    as_bytes = np.where(mask, values, 0).astype(np.uint8)
    assert mask_to_rle(as_bytes) == expected
    assert mask_to_rle(as_bytes.view(np.int8)) == expected  # -128 .. 127 but 0


def test_worst_case_streams_fit_the_buffer_bound() -> None:
    """Runs of one pixel (or one word) are the most bits per input: exactly the bound's 14."""
    from backend.labelstudio import rle_kernels

    checker = np.indices((33, 67)).sum(axis=0) % 2 == 1
    stream = mask_to_rle(checker)
    assert stream == sdk_mask_rle(checker)
    assert len(stream) == (53 + 14 * checker.size) // 8 + 1 <= rle_kernels.stream_capacity(checker.size)
    words = (np.arange(1001) % 2 * 255).astype(np.uint8)
    stream = encode_rle(words)
    assert stream == list(brush.encode_rle(words))
    assert len(stream) == (53 + 14 * words.size) // 8 + 1 <= rle_kernels.stream_capacity(words.size)


def test_read_only_and_strided_inputs_encode_like_a_writable_copy() -> None:
    from backend.labelstudio import rle_kernels

    mask = ragged_ellipse(64, 80, seed=5).astype(np.uint8)
    frozen = mask.copy()
    frozen.flags.writeable = False
    assert mask_to_rle(frozen) == mask_to_rle(mask) == sdk_mask_rle(mask.astype(bool))
    words = np.repeat(np.arange(40, dtype=np.uint8), 5)
    frozen_words = words.copy()
    frozen_words.flags.writeable = False
    assert encode_rle(frozen_words) == encode_rle(words) == list(brush.encode_rle(words))
    assert encode_rle(np.repeat(words, 2)[::2]) == encode_rle(words)
    # one compiled signature serves both: no compile on a new array type at request time
    assert len(rle_kernels.encode_mask.signatures) == len(rle_kernels.encode_words.signatures) == 1


def test_empty_list_encodes_as_a_header() -> None:
    assert encode_rle([]) == encode_rle(np.zeros(0, dtype=np.uint8))


def test_warmup_loads_the_kernels() -> None:
    from backend.labelstudio.rle import warmup

    assert warmup() >= 0.0
    assert mask_to_rle(np.ones((2, 3), bool)) == sdk_mask_rle(np.ones((2, 3), bool))


def test_importing_the_codec_does_not_import_numba() -> None:
    """numba loads on first encode or warmup, so the CLI and /health start fast."""
    code = "import sys, backend.labelstudio.rle; print('numba' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

"""Class-index masks <-> Label Studio brushlabels results."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from backend.errors import InvalidInput, UnknownLabel
from backend.labelstudio.config import (
    DEFAULT_LABEL_CONFIG,
    ClassMap,
    LabelConfig,
    parse_label_config,
)
from backend.labelstudio.results import (
    DecodedAnnotation,
    image_size_from_results,
    mask_to_results,
    results_to_mask,
)
from backend.labelstudio.rle import decode_rle, encode_rle, mask_to_rle

SHARED_MASKS = Path("/work/shared/data/usgra-seg/masks")  # optional real data; never required

CONFIG = parse_label_config(DEFAULT_LABEL_CONFIG)
CLASSES = ClassMap.from_config(CONFIG)


def class_mask(height: int = 6, width: int = 8) -> npt.NDArray[np.uint8]:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[1:3, 2:5] = 1
    mask[4, :] = 2
    return mask


def region(mask: npt.NDArray[np.bool_], label: str, **overrides: Any) -> dict[str, Any]:
    """A result as Label Studio sends it inside an annotation."""
    result: dict[str, Any] = {
        "id": f"r-{label}",
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "origin": "manual",
        "original_width": mask.shape[1],
        "original_height": mask.shape[0],
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
    }
    result.update(overrides)
    return result


# --- mask -> results ----------------------------------------------------------------------


def test_one_result_per_present_label_in_class_order() -> None:
    mask = class_mask()
    results = mask_to_results(mask, CONFIG, CLASSES, scores={"Nerve": np.float32(0.875)})
    assert [r["value"]["brushlabels"] for r in results] == [["Nerve"], ["Vessel"]]
    nerve, vessel = results
    assert {k: v for k, v in nerve.items() if k not in ("id", "value")} == {
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": 8,
        "original_height": 6,
        "image_rotation": 0,
        "readonly": False,
        "score": 0.875,
    }
    assert type(nerve["score"]) is float and type(nerve["original_width"]) is int
    assert "score" not in vessel
    assert nerve["value"]["format"] == "rle"
    json.dumps(results)  # plain JSON types only


def test_regions_are_opaque_rgba_of_exactly_the_class_pixels() -> None:
    mask = class_mask()
    for result in mask_to_results(mask, CONFIG, CLASSES):
        index = CLASSES.index_of(result["value"]["brushlabels"][0])
        rgba = decode_rle(result["value"]["rle"]).reshape(6, 8, 4)
        expected = np.where(mask == index, 255, 0)
        for channel in range(4):
            assert np.array_equal(rgba[..., channel], expected)


def test_region_ids_are_stable_and_distinct() -> None:
    first = mask_to_results(class_mask(), CONFIG, CLASSES)
    again = mask_to_results(class_mask(12, 9), CONFIG, CLASSES)
    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert len({r["id"] for r in first}) == 2
    other_tag = LabelConfig("other", "image", "image", CONFIG.labels)
    assert mask_to_results(class_mask(), other_tag, CLASSES)[0]["id"] != first[0]["id"]


def test_absent_labels_and_empty_masks_give_no_regions() -> None:
    mask = class_mask()
    mask[mask == 2] = 0
    assert [r["value"]["brushlabels"] for r in mask_to_results(mask, CONFIG, CLASSES)] == [["Nerve"]]
    assert mask_to_results(np.zeros((4, 4), np.uint8), CONFIG, CLASSES) == []


def test_matches_the_sdk_encoding() -> None:
    brush = pytest.importorskip("label_studio_sdk.converter.brush")
    mask = class_mask(31, 17)
    for result in mask_to_results(mask, CONFIG, CLASSES):
        index = CLASSES.index_of(result["value"]["brushlabels"][0])
        assert result["value"]["rle"] == list(brush.mask2rle((mask == index).astype(np.uint8) * 255))


def test_label_missing_from_the_config_is_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    wider = ClassMap(("Nerve", "Vessel", "Tendon"))
    mask = class_mask()
    mask[0, 0] = 3
    with caplog.at_level(logging.WARNING):
        results = mask_to_results(mask, CONFIG, wider)
    assert [r["value"]["brushlabels"] for r in results] == [["Nerve"], ["Vessel"]]
    assert "Tendon" in caplog.text


@pytest.mark.parametrize(
    ("mask", "error"),
    [
        pytest.param(np.full((3, 3), 3, np.uint8), UnknownLabel, id="index-above-k"),
        pytest.param(np.full((3, 3), -1, np.int16), UnknownLabel, id="negative-index"),
        pytest.param(np.zeros((3, 3), np.float32), InvalidInput, id="float"),
        pytest.param(np.zeros((3, 3), bool), InvalidInput, id="bool"),
        pytest.param(np.zeros((3, 3, 1), np.uint8), InvalidInput, id="3-d"),
        pytest.param(np.zeros((0, 3), np.uint8), InvalidInput, id="empty"),
    ],
)
def test_bad_class_masks(mask: npt.NDArray[np.generic], error: type[Exception]) -> None:
    with pytest.raises(error):
        mask_to_results(mask, CONFIG, CLASSES)


@pytest.mark.parametrize(
    ("scores", "error"),
    [
        ({"Artery": 0.5}, UnknownLabel),
        ({"Nerve": float("nan")}, InvalidInput),
        ({"Nerve": float("inf")}, InvalidInput),
        ({"Nerve": "high"}, InvalidInput),
        ({"Nerve": None}, InvalidInput),
    ],
)
def test_bad_scores(scores: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        mask_to_results(class_mask(), CONFIG, CLASSES, scores=scores)


# --- results -> mask ----------------------------------------------------------------------


def test_round_trip_on_seeded_random_class_masks() -> None:
    rng = np.random.default_rng(41)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(1, 60, 2))
        mask = rng.choice(3, size=(height, width), p=rng.dirichlet([1, 1, 1])).astype(np.uint8)
        decoded = results_to_mask(mask_to_results(mask, CONFIG, CLASSES), CONFIG, CLASSES, height, width)
        assert np.array_equal(decoded.mask, mask)
        assert decoded.region_count == len(set(np.unique(mask).tolist()) - {0})
        assert decoded.ignored_labels == ()


def test_round_trip_on_real_masks() -> None:
    if SHARED_MASKS.is_dir():
        image = pytest.importorskip("PIL.Image")
        masks = [np.array(image.open(path)) for path in sorted(SHARED_MASKS.glob("*.png"))[:3]]
    else:
        masks = [class_mask(512, 512)]
    for mask in masks:
        decoded = results_to_mask(mask_to_results(mask, CONFIG, CLASSES), CONFIG, CLASSES, *mask.shape)
        assert np.array_equal(decoded.mask, mask)


def test_regions_of_one_label_are_unioned() -> None:
    left, right = np.zeros((4, 6), bool), np.zeros((4, 6), bool)
    left[:, :2], right[1:3, 3:] = True, True
    decoded = results_to_mask([region(left, "Nerve"), region(right, "Nerve")], CONFIG, CLASSES, 4, 6)
    assert np.array_equal(decoded.mask, (left | right).astype(np.uint8))
    assert decoded.region_count == 2


def test_higher_class_index_wins_on_overlap_whatever_the_order() -> None:
    nerve, vessel = np.zeros((4, 6), bool), np.zeros((4, 6), bool)
    nerve[:, :4], vessel[:, 2:] = True, True
    expected = np.array([[1, 1, 2, 2, 2, 2]] * 4, dtype=np.uint8)
    for results in (
        [region(nerve, "Nerve"), region(vessel, "Vessel")],
        [region(vessel, "Vessel"), region(nerve, "Nerve")],
    ):
        assert np.array_equal(results_to_mask(results, CONFIG, CLASSES, 4, 6).mask, expected)


def test_anti_aliased_alpha_is_thresholded() -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (255, 215, 0)  # the label colour in RGB, as the editor paints it
    rgba[0, :, 3] = (60, 127, 128)
    rgba[1, :, 3] = (200, 255, 0)
    result = region(np.zeros((2, 3), bool), "Vessel")
    result["value"]["rle"] = encode_rle(rgba.ravel())
    decoded = results_to_mask([result], CONFIG, CLASSES, 2, 3)
    assert decoded.mask.tolist() == [[0, 0, 2], [2, 2, 0]]


def test_other_types_and_tags_are_skipped_silently(caplog: pytest.LogCaptureFixture) -> None:
    painted = np.ones((3, 3), bool)
    results = [
        {"id": "c", "type": "choices", "from_name": "quality", "to_name": "image", "value": {"choices": ["good"]}},
        {"id": "k", "type": "rectanglelabels", "from_name": "tag", "to_name": "image", "value": {}},
        region(painted, "Nerve", from_name="other_brush"),
        region(painted, "Nerve", to_name="other_image"),
        {"id": "no-type", "from_name": "tag", "to_name": "image"},
    ]
    with caplog.at_level(logging.WARNING):
        decoded = results_to_mask(results, CONFIG, CLASSES, 3, 3)
    assert decoded == DecodedAnnotation(mask=decoded.mask, ignored_labels=(), region_count=0)
    assert not decoded.mask.any()
    assert caplog.records == []


def test_brushlabels_type_matches_case_insensitively() -> None:
    painted = np.ones((2, 2), bool)
    decoded = results_to_mask([region(painted, "Vessel", type="BrushLabels")], CONFIG, CLASSES, 2, 2)
    assert decoded.mask.tolist() == [[2, 2], [2, 2]]


def test_unknown_labels_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    nerve, other = np.zeros((3, 3), bool), np.zeros((3, 3), bool)
    nerve[0], other[2] = True, True
    both = region(other, "Tendon")
    both["value"]["brushlabels"] = ["Tendon", "Vessel"]
    results = [region(other, "Artery"), region(nerve, "Nerve"), region(other, "Artery"), both]
    with caplog.at_level(logging.WARNING):
        decoded = results_to_mask(results, CONFIG, CLASSES, 3, 3)
    assert decoded.ignored_labels == ("Artery", "Tendon")
    assert decoded.region_count == 2
    assert decoded.mask.tolist() == [[1, 1, 1], [0, 0, 0], [2, 2, 2]]
    assert "Artery" in caplog.text and "Tendon" in caplog.text


def test_size_mismatch_is_rejected() -> None:
    painted = np.ones((4, 5), bool)
    with pytest.raises(InvalidInput, match="5x4 but the image is 6x4"):
        results_to_mask([region(painted, "Nerve")], CONFIG, CLASSES, 4, 6)
    with pytest.raises(InvalidInput, match="6x4 but the image is 5x4"):
        results_to_mask([region(painted, "Nerve", original_width=6)], CONFIG, CLASSES, 4, 5)
    # sizes that agree with the image, but an RLE painted for another size
    with pytest.raises(InvalidInput, match=r"result #0 \(id 'r-Nerve'\): RLE holds 80 words but 96 were expected"):
        results_to_mask([region(painted, "Nerve", original_width=6)], CONFIG, CLASSES, 4, 6)


def test_integral_float_sizes_are_accepted() -> None:
    painted = np.ones((2, 2), bool)
    decoded = results_to_mask(
        [region(painted, "Nerve", original_width=2.0, original_height=2.0)], CONFIG, CLASSES, 2, 2
    )
    assert decoded.mask.sum() == 4


def broken(path: str, new: Any) -> dict[str, Any]:
    """A valid 2x2 region with the field at ``path`` (e.g. "value.rle") replaced; ``...`` removes it."""
    result = region(np.ones((2, 2), bool), "Nerve")
    *parents, key = path.split(".")
    target = result
    for parent in parents:
        target = target[parent]
    if new is ...:
        del target[key]
    else:
        target[key] = new
    return result


@pytest.mark.parametrize(
    ("result", "message"),
    [
        pytest.param(broken("value", ...), "no 'value'", id="no-value"),
        pytest.param(broken("value", "rle"), "no 'value'", id="value-not-object"),
        pytest.param(broken("value.rle", ...), "value.rle", id="no-rle"),
        pytest.param(broken("value.rle", [1, 2, 3]), "truncated", id="truncated-rle"),
        pytest.param(broken("value.rle", "0,1,2"), "list of integers", id="rle-string"),
        pytest.param(broken("value.rle", [0, 0, 0, 8, 999]), "0..255", id="rle-out-of-range"),
        pytest.param(broken("value.format", "png"), "format", id="other-format"),
        pytest.param(broken("value.brushlabels", ...), "brushlabels", id="no-labels"),
        pytest.param(broken("value.brushlabels", []), "brushlabels", id="empty-labels"),
        pytest.param(broken("value.brushlabels", "Nerve"), "brushlabels", id="labels-string"),
        pytest.param(broken("value.brushlabels", ["Nerve", 1]), "brushlabels", id="labels-not-strings"),
        pytest.param(broken("original_width", ...), "original_width", id="no-width"),
        pytest.param(broken("original_height", None), "original_height", id="height-none"),
        pytest.param(broken("original_height", "2"), "original_height", id="height-string"),
        pytest.param(broken("original_height", 2.5), "original_height", id="height-fraction"),
        pytest.param(broken("original_height", float("nan")), "original_height", id="height-nan"),
        pytest.param(broken("original_height", True), "original_height", id="height-bool"),
    ],
)
def test_malformed_regions_are_rejected(result: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        results_to_mask([result], CONFIG, CLASSES, 2, 2)


@pytest.mark.parametrize("results", [None, "[]", {"result": []}, [None], ["x"], 3])
def test_results_must_be_a_list_of_objects(results: object) -> None:
    with pytest.raises(InvalidInput):
        results_to_mask(results, CONFIG, CLASSES, 2, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(("height", "width"), [(0, 2), (2, -2), (2.0, 2), (True, 2)])
def test_results_to_mask_rejects_bad_sizes(height: object, width: object) -> None:
    with pytest.raises(InvalidInput):
        results_to_mask([], CONFIG, CLASSES, height, width)  # type: ignore[arg-type]


def test_empty_annotation_is_an_empty_mask() -> None:
    decoded = results_to_mask([], CONFIG, CLASSES, 3, 4)
    assert decoded.mask.shape == (3, 4) and decoded.mask.dtype == np.uint8 and not decoded.mask.any()
    assert decoded.region_count == 0


# --- image size ---------------------------------------------------------------------------


def test_image_size_from_results() -> None:
    results = mask_to_results(class_mask(6, 8), CONFIG, CLASSES)
    assert image_size_from_results(results) == (6, 8)
    with_choice = [{"id": "c", "type": "choices", "value": {"choices": ["ok"]}}, *results]
    assert image_size_from_results(with_choice) == (6, 8)
    assert image_size_from_results([]) is None
    assert image_size_from_results([{"type": "choices", "value": {}}]) is None


@pytest.mark.parametrize(
    "results",
    [
        [{"original_width": 8, "original_height": 6}, {"original_width": 8, "original_height": 7}],
        [{"original_width": 8}],
        [{"original_width": 0, "original_height": 6}],
        [{"original_width": "8", "original_height": 6}],
        [None],
        "results",
    ],
)
def test_image_size_from_bad_results(results: object) -> None:
    with pytest.raises(InvalidInput):
        image_size_from_results(results)  # type: ignore[arg-type]

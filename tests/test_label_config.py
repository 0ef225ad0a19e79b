"""Label config parsing and the class map."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

from backend.errors import InvalidInput, InvalidLabelConfig, UnknownLabel
from backend.labelstudio.config import (
    BACKGROUND,
    DEFAULT_LABEL_CONFIG,
    ClassMap,
    LabelConfig,
    parse_label_config,
)


def brush_config(labels: str, brush_attrs: str = 'name="tag" toName="image"') -> str:
    return f'<View><Image name="image" value="$image"/><BrushLabels {brush_attrs}>{labels}</BrushLabels></View>'


def test_default_config() -> None:
    config = parse_label_config(DEFAULT_LABEL_CONFIG)
    assert config == LabelConfig(
        from_name="tag", to_name="image", image_value_key="image", labels=("Nerve", "Vessel"), predicted_values=None
    )


def test_tag_names_are_case_insensitive_like_label_studio() -> None:
    xml = '<view><IMAGE name="img" value="$url"/><brushlabels name="b" toName="img"><label value="A"/></brushlabels></view>'
    config = parse_label_config(xml)
    assert (config.from_name, config.to_name, config.image_value_key, config.labels) == ("b", "img", "url", ("A",))


def test_lower_case_toname_attribute_is_accepted_like_the_sdk() -> None:
    config = parse_label_config(brush_config('<Label value="A"/>', 'name="tag" toname="image"'))
    assert config.to_name == "image"


def test_first_brushlabels_pointing_at_an_image_wins() -> None:
    xml = """
    <View>
      <Text name="report" value="$text"/>
      <Image name="left" value="$left_image"/>
      <Image name="right" value="$right_image"/>
      <BrushLabels name="on_text" toName="report"><Label value="X"/></BrushLabels>
      <View>
        <BrushLabels name="second" toName="missing,right"><Label value="B"/><Label value="C"/></BrushLabels>
      </View>
      <BrushLabels name="third" toName="left"><Label value="D"/></BrushLabels>
    </View>"""
    config = parse_label_config(xml)
    assert (config.from_name, config.to_name, config.image_value_key, config.labels) == (
        "second",
        "right",
        "right_image",
        ("B", "C"),
    )


def test_labels_keep_config_order_and_use_alias_when_set() -> None:
    config = parse_label_config(
        brush_config(
            '<Label value="Vessel"/><View><Label value="Nerve sheath" alias="Nerve"/></View><Label value="Tendon"/>'
        )
    )
    assert config.labels == ("Vessel", "Nerve", "Tendon")


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ('predicted_values="nerve, vessel,,artery "', ("nerve", "vessel", "artery")),
        ('predicted_values="nerve"', ("nerve",)),
        ('predicted_values=""', None),
        ('predicted_values=" , "', None),
        ("", None),
    ],
)
def test_predicted_values(attribute: str, expected: tuple[str, ...] | None) -> None:
    config = parse_label_config(brush_config('<Label value="A"/>', f'name="tag" toName="image" {attribute}'))
    assert config.predicted_values == expected


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        pytest.param('<View><Image name="image" value="$image"/></View>', "no <BrushLabels>", id="no-brushlabels"),
        pytest.param(
            '<View><Image name="i" value="$i"/><Brush name="b" toName="i"/><Labels name="l" toName="i"><Label value="A"/></Labels></View>',
            "<Brush>",
            id="brush-without-labels",
        ),
        pytest.param(
            '<View><Text name="t" value="$t"/><BrushLabels name="b" toName="t"><Label value="A"/></BrushLabels></View>',
            "none whose toName",
            id="brushlabels-on-text",
        ),
        pytest.param(
            '<View><Image name="i" value="$i"/><BrushLabels toName="i"><Label value="A"/></BrushLabels></View>',
            "none whose toName",
            id="brushlabels-without-name",
        ),
        pytest.param(brush_config(""), "no <Label>", id="no-labels"),
        pytest.param(brush_config('<Label value="A"/><Label value="A"/>'), "duplicate", id="duplicate-labels"),
        pytest.param(brush_config('<Label value="A"/><Label alias="A" value="B"/>'), "duplicate", id="duplicate-alias"),
        pytest.param(brush_config('<Label background="red"/>'), "neither value nor alias", id="label-without-value"),
        pytest.param(brush_config('<Label value="background"/>'), "reserved", id="background-label"),
        pytest.param(brush_config("", 'name="tag" toName="image" value="$labels"'), "dynamic", id="dynamic-labels"),
        pytest.param(
            '<View><Image name="image" value="https://x/y.png"/><BrushLabels name="t" toName="image"><Label value="A"/></BrushLabels></View>',
            "task data",
            id="image-without-variable",
        ),
        pytest.param(brush_config("".join(f'<Label value="L{i}"/>' for i in range(256))), "at most 255", id="too-many"),
    ],
)
def test_unusable_configs_raise_invalid_label_config(xml: str, message: str) -> None:
    with pytest.raises(InvalidLabelConfig, match=message):
        parse_label_config(xml)


@pytest.mark.parametrize(
    "xml",
    [
        pytest.param("", id="empty"),
        pytest.param("   \n", id="blank"),
        pytest.param("<View><Image name='i' value='$i'>", id="unclosed"),
        pytest.param("not xml at all", id="text"),
        pytest.param("<View></Wrong>", id="mismatched"),
        pytest.param('<View a="1" a="2"/>', id="duplicate-attribute"),
        pytest.param(b"<View/>", id="bytes"),
        pytest.param(None, id="none"),
        pytest.param("<View>" + " " * 1_000_001 + "</View>", id="too-large"),
    ],
)
def test_garbage_raises_invalid_label_config(xml: object) -> None:
    with pytest.raises(InvalidLabelConfig):
        parse_label_config(xml)  # type: ignore[arg-type]


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="&lol2;"/></BrushLabels></View>"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE v [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="&xxe;"/></BrushLabels></View>"""


@pytest.mark.parametrize("xml", [BILLION_LAUGHS, EXTERNAL_ENTITY, "<!doctype View><View/>", "<View/><!ENTITY x 'y'>"])
@pytest.mark.parametrize("defusedxml_installed", [True, False])
def test_dtds_and_entities_are_refused(xml: str, defusedxml_installed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not defusedxml_installed:
        monkeypatch.setitem(sys.modules, "defusedxml", None)
        monkeypatch.setitem(sys.modules, "defusedxml.ElementTree", None)
    with pytest.raises(InvalidLabelConfig, match="DOCTYPE or ENTITY"):
        parse_label_config(xml)


def test_stdlib_fallback_parses_the_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "defusedxml", None)
    monkeypatch.setitem(sys.modules, "defusedxml.ElementTree", None)
    assert parse_label_config(DEFAULT_LABEL_CONFIG).labels == ("Nerve", "Vessel")


def test_label_config_is_frozen() -> None:
    config = parse_label_config(DEFAULT_LABEL_CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.from_name = "other"  # type: ignore[misc]


# --- ClassMap -----------------------------------------------------------------------------


def default_map() -> ClassMap:
    return ClassMap.from_config(parse_label_config(DEFAULT_LABEL_CONFIG))


def test_class_map_indices() -> None:
    class_map = default_map()
    assert class_map.names == (BACKGROUND, "Nerve", "Vessel")
    assert class_map.num_classes == 3
    assert [class_map.index_of(name) for name in class_map.names] == [0, 1, 2]
    assert [class_map.name_of(index) for index in range(3)] == list(class_map.names)
    assert class_map.name_of(np.uint8(2)) == "Vessel"


@pytest.mark.parametrize("name", ["nerve", "Artery", "", "Nerve "])
def test_index_of_unknown_label(name: str) -> None:
    with pytest.raises(UnknownLabel, match="Nerve, Vessel"):
        default_map().index_of(name)


@pytest.mark.parametrize("index", [-1, 3, 255, True, 1.0, "1", None])
def test_name_of_unknown_index(index: object) -> None:
    with pytest.raises(UnknownLabel):
        default_map().name_of(index)  # type: ignore[arg-type]


def test_unknown_label_is_an_invalid_input() -> None:
    assert issubclass(UnknownLabel, InvalidInput)


def test_class_map_json_round_trip() -> None:
    class_map = ClassMap(("Nerve", "Vessel", "Tendon"))
    stored = json.loads(json.dumps(class_map.to_json()))
    restored = ClassMap.from_json(stored)
    assert restored == class_map and hash(restored) == hash(class_map)
    assert restored.names == class_map.names


@pytest.mark.parametrize(
    "data",
    [
        {"labels": ["Nerve"]},
        {"schema": 2, "labels": ["Nerve"]},
        {"schema": 1},
        {"schema": 1, "labels": "Nerve"},
        {"schema": 1, "labels": ["Nerve", 3]},
        {"schema": 1, "labels": []},
        {"schema": 1, "labels": ["Nerve", "Nerve"]},
        {"schema": 1, "labels": ["background"]},
        ["Nerve"],
        "Nerve",
    ],
)
def test_class_map_from_malformed_json(data: object) -> None:
    with pytest.raises(InvalidInput):
        ClassMap.from_json(data)  # type: ignore[arg-type]


def test_class_map_rejects_bad_labels_directly() -> None:
    bad: list[object] = [(), [], ("A", "A"), ("",), (BACKGROUND,), "AB", None, ("A", 1)]
    for labels in bad:
        with pytest.raises(InvalidLabelConfig):
            ClassMap(labels)  # type: ignore[arg-type]
    assert ClassMap(["A", "B"]) == ClassMap(("A", "B"))  # type: ignore[arg-type]
    assert hash(ClassMap(["A", "B"])) == hash(ClassMap(("A", "B")))  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        default_map().labels = ("X",)  # type: ignore[misc]

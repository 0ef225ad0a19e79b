"""Property-based tests of the label-config parser (backend.labelstudio.config.parse_label_config).

The contract: whatever text arrives (it comes from Label Studio's /setup and /predict bodies,
i.e. from anyone who can reach the backend), ``parse_label_config`` returns a
:class:`LabelConfig` or raises :class:`InvalidLabelConfig` / :class:`InvalidInput` with a
message; never another exception, never a hang, with defusedxml and with the stdlib fallback.
When it returns, the result must be consistent with the document (a BrushLabels name, an Image
it points at, unique non-reserved labels). Valid configs built by hypothesis must parse to
exactly their labels.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock
from xml.sax.saxutils import escape, quoteattr

import pytest

from backend.errors import InvalidInput, InvalidLabelConfig
from backend.labelstudio import config as config_module
from backend.labelstudio.config import BACKGROUND, MAX_LABELS, LabelConfig, parse_label_config

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SECONDS = 2.0

TAGS = [
    "View",
    "Image",
    "BrushLabels",
    "Brush",
    "Label",
    "Labels",
    "RectangleLabels",
    "PolygonLabels",
    "KeyPointLabels",
    "Choices",
    "Choice",
    "Text",
    "Header",
    "TextArea",
    "Style",
    "Number",
    "Rating",
]
ATTRS = [
    "name",
    "toName",
    "toname",
    "value",
    "alias",
    "background",
    "predicted_values",
    "zoom",
    "choice",
    "showInline",
    "hotkey",
    "strokeWidth",
    "smart",
    "xmlns",
    "xmlns:x",
    "x:name",
]


def xml_chars(**kwargs: Any) -> st.SearchStrategy[str]:
    """Text XML 1.0 allows (no C0 controls but tab/newline/return, no surrogates, no FFFE/FFFF)."""
    return st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffe\uffff", min_codepoint=0x20)
        | st.sampled_from("\t\n\r"),
        **kwargs,
    )


def _both_parsers() -> list[str]:
    return ["defusedxml", "stdlib"]


@contextmanager
def parser(kind: str) -> Iterator[None]:
    if kind == "stdlib":
        with mock.patch.object(config_module, "_xml_parser", lambda: ET.fromstring):
            yield
    else:
        yield


def outcome(xml: object, kind: str = "defusedxml") -> LabelConfig | InvalidInput:
    """parse_label_config's result or its InvalidInput; any other exception fails the test."""
    started = time.perf_counter()
    with parser(kind):
        try:
            result: LabelConfig | InvalidInput = parse_label_config(xml)  # type: ignore[arg-type]
        except InvalidInput as exc:
            assert isinstance(exc.message, str) and exc.message
            result = exc
    elapsed = time.perf_counter() - started
    assert elapsed < SECONDS, f"took {elapsed:.2f} s"
    if isinstance(result, LabelConfig):
        check_consistent(xml, result)  # type: ignore[arg-type]
    return result


def check_consistent(xml: str, config: LabelConfig) -> None:
    assert config.from_name and config.to_name and config.image_value_key
    assert 1 <= len(config.labels) <= MAX_LABELS
    assert len(set(config.labels)) == len(config.labels) and BACKGROUND not in config.labels
    assert all(isinstance(label, str) and label for label in config.labels)
    root = ET.fromstring(xml)
    tags = {(el.tag.lower() if isinstance(el.tag, str) else "", el.attrib.get("name")) for el in root.iter()}
    assert ("brushlabels", config.from_name) in tags
    assert ("image", config.to_name) in tags


# -- generated documents ----------------------------------------------------------------------

attr_values = st.one_of(
    st.sampled_from(["image", "$image", "tag", "Nerve", "background", "", "$", "$labels", "image,other", " , "]),
    xml_chars(max_size=12),
)
attributes = st.dictionaries(st.sampled_from(ATTRS), attr_values, max_size=5)
tag_names = st.sampled_from(TAGS) | st.sampled_from(TAGS).map(str.lower) | st.sampled_from(TAGS).map(str.upper)


def render(node: Any) -> str:
    tag, attrs, children = node
    text = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
    if not children:
        return f"<{tag}{text}/>"
    inner = "".join(child if isinstance(child, str) else render(child) for child in children)
    return f"<{tag}{text}>{inner}</{tag}>"


nodes = st.recursive(
    st.tuples(tag_names, attributes, st.just([])),
    lambda children: st.tuples(
        tag_names, attributes, st.lists(children | xml_chars(max_size=5).map(escape), max_size=5)
    ),
    max_leaves=30,
)
documents = st.tuples(st.sampled_from(["View"]) | tag_names, attributes, st.lists(nodes, max_size=6)).map(render)

label_names = xml_chars(min_size=1, max_size=20).filter(lambda s: s != BACKGROUND)


def harmless(node: Any) -> bool:
    """Noise that cannot change the answer: no BrushLabels/Image anywhere, no namespace games."""
    tag, attrs, children = node
    return (
        tag.lower() not in {"brushlabels", "image"}
        and not any(":" in key or key.startswith("xmlns") for key in attrs)
        and all(isinstance(child, str) or harmless(child) for child in children)
    )


@st.composite
def valid_configs(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A usable config with noise around it, and the labels it must parse to."""
    labels = draw(st.lists(label_names, min_size=1, max_size=30, unique=True))
    image = draw(xml_chars(min_size=1, max_size=10).filter(lambda s: "," not in s and s.strip() == s))
    key = draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,9}", fullmatch=True))
    parts = []
    for label in labels:
        if draw(st.booleans()):
            parts.append(f"<Label value={quoteattr(label)} background={quoteattr(draw(xml_chars(max_size=8)))}/>")
        else:  # the alias is the name; the value is whatever
            parts.append(
                f"<View><Label alias={quoteattr(label)} value={quoteattr(draw(xml_chars(max_size=8)))}/></View>"
            )
    noise = draw(st.lists(nodes.filter(harmless), max_size=3))
    brush = f'<BrushLabels name="tag" toName={quoteattr("missing," + image)}>{"".join(parts)}</BrushLabels>'
    body = f"<Image name={quoteattr(image)} value={quoteattr('$' + key)}/>" + "".join(map(render, noise)) + brush
    return f"<View>{body}</View>", labels


# -- properties -------------------------------------------------------------------------------


@PROPERTY
@given(st.text(max_size=300) | st.binary(max_size=50).map(lambda b: b.decode("latin-1")))
def test_arbitrary_text_parses_or_raises_invalid_input(xml: str) -> None:
    for kind in _both_parsers():
        outcome(xml, kind)


@PROPERTY
@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text()), st.dictionaries(st.text(), st.text())))
def test_non_text_raises_invalid_label_config(xml: object) -> None:
    assert isinstance(outcome(xml), InvalidLabelConfig)


@PROPERTY
@given(documents)
def test_trees_of_label_studio_tags_parse_or_raise_invalid_input(xml: str) -> None:
    results = [outcome(xml, kind) for kind in _both_parsers()]
    if isinstance(results[0], LabelConfig) or isinstance(results[1], LabelConfig):
        assert results[0] == results[1]  # both parsers agree on what they accept


@PROPERTY
@given(valid_configs())
def test_valid_configs_parse_to_their_labels(case: tuple[str, list[str]]) -> None:
    xml, labels = case
    for kind in _both_parsers():
        config = outcome(xml, kind)
        assert isinstance(config, LabelConfig), config
        assert config.labels == tuple(labels) and config.from_name == "tag"


@PROPERTY
@given(valid_configs(), st.data())
def test_mutated_configs_parse_or_raise_invalid_input(case: tuple[str, list[str]], data: st.DataObject) -> None:
    xml, _ = case
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(xml)))
        if data.draw(st.booleans()):
            xml = xml[:at] + xml[at + data.draw(st.integers(1, 5)) :]
        else:
            xml = (
                xml[:at]
                + data.draw(
                    st.sampled_from(
                        [
                            "<",
                            ">",
                            "&",
                            '"',
                            "</View>",
                            "<View>",
                            "&#0;",
                            "]]>",
                            "<!--",
                            "-->",
                            "<?x?>",
                            "\x00",
                            "\ud800",
                            "&amp;",
                        ]
                    )
                )
                + xml[at:]
            )
    for kind in _both_parsers():
        outcome(xml, kind)


dtd_keyword = st.sampled_from(["DOCTYPE", "ENTITY", "doctype", "entity", "DocType", "Entity", "ELEMENT", "ATTLIST"])


@PROPERTY
@given(
    dtd_keyword,
    st.sampled_from(["", " ", "\n", "\t", "  \r\n"]),
    st.sampled_from(
        [
            'View [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]',
            'View SYSTEM "file:///etc/passwd"',
            'View PUBLIC "-//x//y" "http://127.0.0.1:9/evil.dtd"',
            'View [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]',
            "x",
            "",
        ]
    ),
    st.sampled_from(["head", "inside", "tail"]),
    st.sampled_from(["&b;", "&a;", "&xxe;", "", "&#60;"]),
)
def test_dtd_and_entity_tricks_are_refused(keyword: str, gap: str, body: str, where: str, ref: str) -> None:
    decl = f"<!{gap}{keyword} {body}>"
    core = f'<Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="A{ref}"/></BrushLabels>'
    xml = {
        "head": f"{decl}<View>{core}</View>",
        "inside": f"<View>{decl}{core}</View>",
        "tail": f"<View>{core}</View>{decl}",
    }[where]
    for kind in _both_parsers():
        result = outcome(xml, kind)
        if keyword.upper() in {"DOCTYPE", "ENTITY"}:
            assert isinstance(result, InvalidLabelConfig), result
        else:  # <!ELEMENT>/<!ATTLIST> outside a DTD are not XML
            assert isinstance(result, InvalidInput), result


CORE = '<Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="A"/></BrushLabels>'


@pytest.mark.parametrize("depth", [1_000, 10_000, 70_000])
@pytest.mark.parametrize("kind", _both_parsers())
def test_deep_nesting_parses_in_bounded_time(depth: int, kind: str) -> None:
    wrapped = "<View>" * depth + CORE + "</View>" * depth
    config = outcome(wrapped, kind)
    assert isinstance(config, LabelConfig) and config.labels == ("A",)
    inside = (
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        + "<View>" * depth
        + '<Label value="A"/>'
        + "</View>" * depth
        + "</BrushLabels></View>"
    )
    assert outcome(inside, kind) == config
    unclosed = "<View>" * depth + CORE  # never closed: refused, not a stack overflow
    assert isinstance(outcome(unclosed, kind), InvalidLabelConfig)


@pytest.mark.parametrize("kind", _both_parsers())
def test_nesting_beyond_the_size_limit_is_refused_before_parsing(kind: str) -> None:
    assert isinstance(outcome("<View>" * 100_000 + CORE + "</View>" * 100_000, kind), InvalidLabelConfig)
    assert isinstance(outcome("<a>" * 1_000_000, kind), InvalidLabelConfig)


@PROPERTY
@given(
    st.sampled_from(["name", "value", "alias", "toName", "background", "predicted_values", "junk"]),
    st.integers(1_000, 990_000),
    st.sampled_from(["A", "&amp;", ",", " ", "é"]),
)
def test_huge_attribute_values_are_bounded(attribute: str, length: int, unit: str) -> None:
    value = unit * (length // len(unit))
    xml = f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="A" {attribute}="{value}"/></BrushLabels></View>'
    outcome(xml[:1_000_000] if len(xml) > 1_000_000 else xml)
    outcome(xml + " " * 1_000_001)  # over the limit: refused by size


@pytest.mark.parametrize("count", [255, 256, 50_000])
def test_many_labels_images_and_brush_tags_are_bounded(count: int) -> None:
    labels = "".join(f'<Label value="L{i}"/>' for i in range(count))
    result = outcome(
        f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}</BrushLabels></View>'
    )
    assert isinstance(result, LabelConfig) if count <= MAX_LABELS else isinstance(result, InvalidLabelConfig)
    many = (
        '<Image name="x" value="$x"/>' * min(count, 20_000)
        + '<BrushLabels name="t" toName="y"><Label value="A"/></BrushLabels>' * 200
    )
    assert isinstance(outcome(f"<View>{many}</View>"), InvalidLabelConfig)
    names = ",".join(["nope"] * min(count, 100_000))
    outcome(
        f'<View><Image name="image" value="$image"/><BrushLabels name="t" toName="{names},image"><Label value="A"/></BrushLabels></View>'
    )

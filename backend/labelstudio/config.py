"""A project's Label Studio label config: which brush tag we fill and which classes it has.

Label Studio gives the label config as XML (``/setup`` ``schema``, ``/predict``
``label_config``). We read only what brush pre-annotation needs, the ``<BrushLabels>`` tag,
the ``<Image>`` it points at and its ``<Label>`` children, and turn the labels into a
:class:`ClassMap`, the single place where label names meet class indices.

Matching rules, chosen to follow Label Studio and its SDK (``label_interface``):

* Tag names match case-insensitively (``BrushLabels``, ``brushlabels``), as the SDK and
  the editor look tags up in lower case. Attribute names are exact (``toName``), with the
  SDK's lower-case fallback (``toname``).
* Only ``<BrushLabels>`` is a source. Label Studio also has a bare ``<Brush>`` tag whose
  regions (type ``brush``) carry no label: labels come from a separate ``<Labels>`` tag,
  linked per region. We do not support that pairing; such a config is rejected.
* With several ``<BrushLabels>``, the first (in document order) whose ``toName`` names an
  ``<Image>`` wins; ``toName`` may list several names, the first that is an Image is used.
* A label's name is its ``alias`` if set, else its ``value``: that is what the SDK reports
  and what lands in ``value.brushlabels`` of a result.
"""

from __future__ import annotations

import functools
import importlib
import logging
import operator
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, SupportsIndex

from backend.errors import InvalidInput, InvalidLabelConfig, UnknownLabel

__all__ = [
    "BACKGROUND",
    "DEFAULT_LABEL_CONFIG",
    "ClassMap",
    "LabelConfig",
    "label_config_for",
    "parse_label_config",
]

logger = logging.getLogger(__name__)

DEFAULT_LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Nerve" background="rgba(255,215,0,0.6)"/>
    <Label value="Vessel" background="rgba(220,20,60,0.6)"/>
  </BrushLabels>
</View>
"""


def label_config_for(class_names: tuple[str, ...] | list[str]) -> str:
    """A brush label config for a project's class map (what ``sonoseg project create-ls`` and the
    Label Studio export use): image under ``$image``, one ``BrushLabels`` named ``tag``, the
    labels in class-index order with the overlay colours of :mod:`backend.model.overlay`."""
    from xml.sax.saxutils import quoteattr

    colours = ((255, 215, 0), (220, 20, 60), (30, 144, 255), (50, 205, 50), (186, 85, 211), (255, 140, 0))
    names = tuple(class_names)
    ClassMap(names)  # refuses empty, duplicate, reserved or too many labels
    labels = "\n".join(
        f'    <Label value={quoteattr(name)} background="rgba({r},{g},{b},0.6)"/>'
        for name, (r, g, b) in zip(names, (colours[i % len(colours)] for i in range(len(names))), strict=True)
    )
    return (
        '<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
        f'  <BrushLabels name="tag" toName="image">\n{labels}\n  </BrushLabels>\n</View>\n'
    )


BACKGROUND = "background"
"""Name of class 0. It is reserved: no label may be called exactly this."""

MAX_LABELS = 255
"""Class indices live in uint8 masks: background plus at most 255 labels."""

_MAX_CONFIG_CHARS = 1_000_000
_CLASS_MAP_SCHEMA = 1
# Entity expansion ("billion laughs") and external entities both need a DTD. We refuse any
# DTD before parsing, so even the stdlib parser never sees one; defusedxml (when installed)
# refuses them again. Label configs never need a DTD.
_DTD_PATTERN = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class LabelConfig:
    """The brush tag pair of a project's label config.

    ``image_value_key`` is the task data key of the image (``"image"`` for ``value="$image"``).
    ``predicted_values`` is the comma-separated ``predicted_values`` attribute of the
    BrushLabels tag, or None when it is absent or empty.
    """

    from_name: str
    to_name: str
    image_value_key: str
    labels: tuple[str, ...]
    predicted_values: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ClassMap:
    """Label names <-> class indices: background is 0, labels are 1..K in config order.

    Stored with each model version (``to_json``), so a mask's indices keep their meaning
    even after the project's label config changes.
    """

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        labels: object = self.labels  # a JSON column hands over a list despite the annotation
        if isinstance(labels, list):  # keep it hashable
            object.__setattr__(self, "labels", tuple(labels))
        if not isinstance(self.labels, tuple) or not self.labels:
            raise InvalidLabelConfig("a class map needs a non-empty sequence of label names")
        if len(self.labels) > MAX_LABELS:
            raise InvalidLabelConfig(f"at most {MAX_LABELS} labels are supported, got {len(self.labels)}")
        for name in self.labels:
            if not isinstance(name, str) or not name:
                raise InvalidLabelConfig(f"label names must be non-empty strings, got {name!r}")
        if BACKGROUND in self.labels:
            raise InvalidLabelConfig(f"{BACKGROUND!r} is reserved for class 0 and cannot be a label name")
        duplicates = sorted({name for name in self.labels if self.labels.count(name) > 1})
        if duplicates:
            raise InvalidLabelConfig(f"duplicate label names: {', '.join(duplicates)}")

    @classmethod
    def from_config(cls, config: LabelConfig) -> ClassMap:
        """The class map of a parsed label config (labels in config order)."""
        return cls(config.labels)

    @property
    def names(self) -> tuple[str, ...]:
        """All class names by index: ``names[0]`` is the background."""
        return (BACKGROUND, *self.labels)

    @property
    def num_classes(self) -> int:
        """Number of classes including the background."""
        return len(self.labels) + 1

    def index_of(self, name: str) -> int:
        """Class index of a label name (``BACKGROUND`` is 0); raises :class:`UnknownLabel`."""
        if name == BACKGROUND:
            return 0
        try:
            return self.labels.index(name) + 1
        except ValueError:
            raise UnknownLabel(f"unknown label {name!r}; known labels: {', '.join(self.labels)}") from None

    def name_of(self, index: SupportsIndex) -> str:
        """Class name of an index (0 is ``BACKGROUND``); raises :class:`UnknownLabel`."""
        try:
            position = -1 if isinstance(index, bool) else operator.index(index)
        except TypeError:
            position = -1
        if not 0 <= position <= len(self.labels):
            raise UnknownLabel(f"unknown class index {index!r}; valid indices are 0..{len(self.labels)}")
        return self.names[position]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict for a database JSON column; ``from_json`` reads it back."""
        return {"schema": _CLASS_MAP_SCHEMA, "labels": list(self.labels)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClassMap:
        """Rebuild a class map stored by ``to_json``; raises :class:`InvalidInput` if malformed."""
        if not isinstance(data, Mapping) or data.get("schema") != _CLASS_MAP_SCHEMA:
            raise InvalidInput(f"not a stored class map (expected schema {_CLASS_MAP_SCHEMA}): {data!r:.200}")
        labels = data.get("labels")
        if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
            raise InvalidInput(f"stored class map has no list of label names: {data!r:.200}")
        return cls(tuple(labels))


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a label config; raises :class:`InvalidLabelConfig` if it has no usable brush tag."""
    root = _parse_xml(xml)
    images = {
        element.attrib["name"]: element
        for element in root.iter()
        if _tag(element) == "image" and element.attrib.get("name")
    }
    candidates = [element for element in root.iter() if _tag(element) == "brushlabels"]
    chosen: tuple[ET.Element, str] | None = None
    for element in candidates:
        name = element.attrib.get("name", "")
        target = next((t for t in _to_names(element) if t in images), None)
        if not name or target is None:
            logger.debug("skipping BrushLabels %r: it names no Image (toName=%r)", name, _attr(element, "toName"))
            continue
        if chosen is None:
            chosen = (element, target)
        else:
            # debug, not warning: this runs on every /predict
            logger.debug("several BrushLabels; using %r, ignoring %r", chosen[0].attrib["name"], name)
    if chosen is None:
        raise InvalidLabelConfig(_no_brush_message(root, candidates))
    brush, to_name = chosen
    return LabelConfig(
        from_name=brush.attrib["name"],
        to_name=to_name,
        image_value_key=_image_value_key(images[to_name]),
        labels=_labels_of(brush),
        predicted_values=_split_values(_attr(brush, "predicted_values")),
    )


def _parse_xml(xml: str) -> ET.Element:
    """Parse untrusted XML, refusing DTDs (and so entity tricks) outright."""
    if not isinstance(xml, str):
        raise InvalidLabelConfig(f"label config must be XML text, got {type(xml).__name__}")
    if not xml.strip():
        raise InvalidLabelConfig("label config is empty")
    if len(xml) > _MAX_CONFIG_CHARS:
        raise InvalidLabelConfig(f"label config is too large ({len(xml)} characters, limit {_MAX_CONFIG_CHARS})")
    if _DTD_PATTERN.search(xml):
        raise InvalidLabelConfig("label config must not contain a DOCTYPE or ENTITY declaration")
    try:
        return _xml_parser()(xml)
    except (ET.ParseError, ValueError) as exc:  # defusedxml's refusals are ValueErrors
        raise InvalidLabelConfig(f"label config is not valid XML: {exc}") from exc


def _xml_parser() -> Callable[[str], ET.Element]:
    """defusedxml when installed (defence in depth), else the stdlib parser.

    The stdlib fallback is safe here because ``_parse_xml`` has already refused any DTD.
    """
    try:
        defused = importlib.import_module("defusedxml.ElementTree")
    except ImportError:
        return ET.fromstring
    parse: Callable[[str], ET.Element] = functools.partial(defused.fromstring, forbid_dtd=True)
    return parse


def _tag(element: ET.Element) -> str:
    return element.tag.lower() if isinstance(element.tag, str) else ""


def _attr(element: ET.Element, name: str) -> str | None:
    """An attribute by exact name, falling back to lower case like the LS SDK."""
    value = element.attrib.get(name)
    return value if value is not None else element.attrib.get(name.lower())


def _to_names(element: ET.Element) -> list[str]:
    return [name.strip() for name in (_attr(element, "toName") or "").split(",") if name.strip()]


def _image_value_key(image: ET.Element) -> str:
    value = (image.attrib.get("value") or "").strip()
    if not value.startswith("$") or len(value) < 2:
        raise InvalidLabelConfig(
            f"Image {image.attrib.get('name')!r} must take its URL from the task data, "
            f'like value="$image"; got value={value!r}'
        )
    return value[1:]


def _labels_of(brush: ET.Element) -> tuple[str, ...]:
    name = brush.attrib["name"]
    if (brush.attrib.get("value") or "").startswith("$"):
        raise InvalidLabelConfig(f'BrushLabels {name!r} uses dynamic labels (value="$..."), which are not supported')
    labels = []
    for element in brush.iter():
        if _tag(element) != "label":
            continue
        label = element.attrib.get("alias") or element.attrib.get("value")
        if not label:
            raise InvalidLabelConfig(f"a Label in BrushLabels {name!r} has neither value nor alias")
        labels.append(label)
    if not labels:
        raise InvalidLabelConfig(f"BrushLabels {name!r} has no <Label> children")
    return ClassMap(tuple(labels)).labels  # validates: unique, not 'background', <= 255


def _split_values(raw: str | None) -> tuple[str, ...] | None:
    values = tuple(part.strip() for part in (raw or "").split(",") if part.strip())
    return values or None


def _no_brush_message(root: ET.Element, candidates: list[ET.Element]) -> str:
    if candidates:
        return "label config has BrushLabels, but none whose toName names an <Image name=...> tag"
    if any(_tag(element) == "brush" for element in root.iter()):
        return "label config uses <Brush> with separate <Labels>; use <BrushLabels> with <Label> children instead"
    return "label config has no <BrushLabels> tag; brush pre-annotation needs one pointing at an <Image>"

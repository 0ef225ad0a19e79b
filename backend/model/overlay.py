"""Rendering masks over frames for people to look at.

- :func:`overlay`: a mask tinted and outlined over its frame (pure numpy, no text).
- :func:`labelled_overlay`: one panel at the frame's own size, contours in class colours, a legend
  with the class names and an optional title (``sonoseg model predict`` writes it as
  ``<name>_overlay.png``, pixel-aligned with ``<name>_mask.png``).
- :func:`review_panel`: three panels side by side (image | label | model) under a header with the
  title (kind, score, reason) and the legend (``sonoseg review``).

Contours are drawn with numpy at the panel's resolution; matplotlib (Agg, no pyplot state) only
lays out the text on top, so one panel takes tens of milliseconds. Class ``i`` (mask value, 1-based)
is ``class_names[i - 1]`` and is drawn in ``CLASS_COLOURS[(i - 1) % len(CLASS_COLOURS)]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

# Overlay colours per foreground class (RGB), cycled when there are more classes.
CLASS_COLOURS = ((255, 215, 0), (220, 20, 60), (30, 144, 255), (50, 205, 50), (186, 85, 211), (255, 140, 0))

DPI = 100
# Review panels are scaled (nearest neighbour, by an integer factor) so that their longer side is
# at least PANEL_MIN_SIDE (small frames stay readable next to the text) and at most PANEL_MAX_SIDE.
PANEL_MIN_SIDE = 256
PANEL_MAX_SIDE = 640
# labelled_overlay draws no text on frames whose shorter side is below this: it would cover them.
TEXT_MIN_SIDE = 64
_TINT = 0.18


def class_colour(cls: int) -> tuple[int, int, int]:
    """RGB colour of foreground class ``cls`` (mask value, >= 1)."""
    return CLASS_COLOURS[(cls - 1) % len(CLASS_COLOURS)]


def overlay(frame: NDArray[Any], mask: NDArray[Any], alpha: float = 0.45) -> NDArray[Any]:
    """RGB uint8 (H, W, 3): the uint8 frame in grey, each class tinted and outlined in its colour."""
    if frame.shape != mask.shape:
        raise ValueError(f"frame {frame.shape} and mask {mask.shape} differ in shape")
    rgb = np.repeat(frame[..., None], 3, axis=-1).astype(np.float32)
    for cls in range(1, int(mask.max(initial=0)) + 1):
        region = mask == cls
        if not region.any():
            continue
        colour = np.array(class_colour(cls), np.float32)
        rgb[region] = (1 - alpha) * rgb[region] + alpha * colour
        rgb[region & ~ndimage.binary_erosion(region)] = colour
    return np.clip(rgb, 0, 255).astype(np.uint8)


def contours(frame: NDArray[Any], mask: NDArray[Any] | None, *, thickness: int = 1) -> NDArray[np.uint8]:
    """RGB uint8 (H, W, 3): the grey frame, each class faintly tinted and its contour drawn in its colour.

    The contour is the region's inner boundary (4-neighbour erosion), ``thickness`` pixels wide;
    ``mask`` None: the frame only.
    """
    if frame.ndim != 2:
        raise ValueError(f"expected a 2D grey frame, got {frame.shape}")
    if mask is not None and frame.shape != mask.shape:
        raise ValueError(f"frame {frame.shape} and mask {mask.shape} differ in shape")
    out = np.repeat(np.asarray(frame, np.uint8)[..., None], 3, axis=-1)
    if mask is None:
        return out
    structure = ndimage.generate_binary_structure(2, 1)
    for cls in np.unique(mask):
        if cls == 0:
            continue
        region = mask == cls
        colour = np.array(class_colour(int(cls)), np.float32)
        out[region] = ((1 - _TINT) * out[region] + _TINT * colour).astype(np.uint8)
        inner = ndimage.binary_erosion(region, structure, iterations=max(1, thickness), border_value=0)
        out[region & ~inner] = colour.astype(np.uint8)
    return out


def panel_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of one panel of :func:`review_panel` for a frame of this size."""
    up, down = _panel_factors(height, width)
    return (height * up, width * up) if up > 1 else (-(-height // down), -(-width // down))


def _panel_factors(height: int, width: int) -> tuple[int, int]:
    longest = max(height, width)
    if longest < PANEL_MIN_SIDE:
        return math.ceil(PANEL_MIN_SIDE / longest), 1
    return 1, max(1, math.ceil(longest / PANEL_MAX_SIDE))


def _rescale(a: NDArray[Any], up: int, down: int) -> NDArray[Any]:
    if up > 1:
        return np.repeat(np.repeat(a, up, axis=0), up, axis=1)
    return a[::down, ::down] if down > 1 else a


def _thickness(height: int, width: int) -> int:
    return max(1, round(min(height, width) / 300))


def labelled_overlay(
    frame: NDArray[Any], mask: NDArray[Any], class_names: Sequence[str], title: str | None = None
) -> NDArray[np.uint8]:
    """RGB uint8 (H, W, 3), the frame's own size: contours in class colours, a legend of
    ``class_names`` (foreground names, mask value i is ``class_names[i - 1]``) top left, ``title``
    bottom left. Frames with a side under :data:`TEXT_MIN_SIDE` get the contours only."""
    if frame.shape != mask.shape:
        raise ValueError(f"frame {frame.shape} and mask {mask.shape} differ in shape")
    h, w = frame.shape
    rgb = contours(frame, mask, thickness=_thickness(h, w))
    if min(h, w) < TEXT_MIN_SIDE:
        return rgb
    font_px = float(np.clip(min(h, w) / 28, 8, 16))
    layer = _TextLayer(rgb)
    _legend(layer.fig, class_names, font_px, loc="upper left")
    if title:
        layer.fig.text(
            0.01,
            0.01,
            title,
            fontsize=_pt(font_px),
            color="white",
            ha="left",
            va="bottom",
            bbox={"facecolor": "black", "alpha": 0.55, "pad": 2, "linewidth": 0},
        )
    return layer.render()


def review_panel(
    frame: NDArray[Any],
    label: NDArray[Any],
    prediction: NDArray[Any] | None,
    class_names: Sequence[str],
    title: str,
    *,
    captions: tuple[str, str, str] = ("image", "label", "model"),
) -> NDArray[np.uint8]:
    """RGB uint8: a header (``title``, may hold a second line after a newline, and the class legend)
    above three panels side by side: the frame, the label's contours, the prediction's contours
    (``None``: the frame dimmed, captioned "none"). Width is 3 x :func:`panel_size`'s width.

    ``captions`` name the panels; the third need not be a model (a second rater's label, say).
    """
    if frame.ndim != 2 or frame.shape != label.shape or (prediction is not None and prediction.shape != frame.shape):
        raise ValueError(
            f"frame {frame.shape}, label {label.shape} and prediction "
            f"{None if prediction is None else prediction.shape} must be 2D and of one shape"
        )
    up, down = _panel_factors(*frame.shape)
    grey = _rescale(np.asarray(frame, np.uint8), up, down)
    ph, pw = grey.shape
    thickness = _thickness(ph, pw)
    third = (
        contours(grey, _rescale(prediction, up, down), thickness=thickness)
        if prediction is not None
        else np.repeat((grey // 3)[..., None], 3, axis=-1)
    )
    base = contours(grey, None)
    panels = np.concatenate([base, contours(grey, _rescale(label, up, down), thickness=thickness), third], 1)
    font_px = 14.0
    lines = title.count("\n") + 1
    header = round(font_px * 1.5 * lines + 10)
    rgb = np.zeros((header + ph, 3 * pw, 3), np.uint8)
    rgb[header:] = panels
    rgb[header:, pw - 1 : pw + 1] = 80  # thin separators between the panels
    rgb[header:, 2 * pw - 1 : 2 * pw + 1] = 80
    layer = _TextLayer(rgb)
    fig, height, width = layer.fig, layer.height, layer.width
    fig.text(5 / width, 1 - 5 / height, title, fontsize=_pt(font_px), color="white", ha="left", va="top")
    _legend(fig, class_names, font_px, loc="upper right")
    third_caption = captions[2] if prediction is not None else f"{captions[2]}: none"
    for i, caption in enumerate((captions[0], captions[1], third_caption)):
        fig.text(
            (i * pw + 5) / width,
            1 - (header + 5) / height,
            caption,
            fontsize=_pt(12.0),
            color="white",
            ha="left",
            va="top",
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "linewidth": 0},
        )
    return layer.render()


def _pt(px: float) -> float:
    return px * 72.0 / DPI


class _TextLayer:
    """A transparent matplotlib figure exactly the size of ``base``, for text only (the object API,
    no pyplot state). :meth:`render` composites it over ``base``: the pixels never go through
    matplotlib's image resampling, which would cost more than everything else together."""

    def __init__(self, base: NDArray[np.uint8]) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.base = base
        self.height, self.width = base.shape[:2]
        self.fig = Figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI)
        self.fig.patch.set_alpha(0.0)
        self.canvas = FigureCanvasAgg(self.fig)

    def render(self) -> NDArray[np.uint8]:
        self.canvas.draw()  # type: ignore[no-untyped-call]
        # straight (not premultiplied) alpha
        buf = np.asarray(self.canvas.buffer_rgba())  # type: ignore[no-untyped-call]
        out = np.array(self.base, np.uint8, copy=True)
        hh, ww = min(self.height, buf.shape[0]), min(self.width, buf.shape[1])  # canvas size rounding
        text, under = buf[:hh, :ww], out[:hh, :ww]
        drawn = text[..., 3] > 0
        if drawn.any():
            alpha = text[..., 3][drawn].astype(np.float32)[:, None] / 255.0
            blended = text[..., :3][drawn] * alpha + under[drawn].astype(np.float32) * (1 - alpha)
            under[drawn] = np.clip(blended, 0, 255).astype(np.uint8)
        return out


def _rgb01(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return (colour[0] / 255, colour[1] / 255, colour[2] / 255)


def _legend(fig: Any, class_names: Sequence[str], font_px: float, *, loc: str) -> None:
    from matplotlib.patches import Patch

    if not class_names:
        return
    handles = [
        Patch(facecolor=_rgb01(class_colour(i)), edgecolor="white", label=name)
        for i, name in enumerate(class_names, start=1)
    ]
    fig.legend(
        handles=handles,
        loc=loc,
        ncol=len(handles) if loc == "upper right" else 1,
        fontsize=_pt(font_px),
        frameon=True,
        framealpha=0.55,
        facecolor="black",
        edgecolor="none",
        labelcolor="white",
        handlelength=1.0,
        handleheight=0.8,
        borderaxespad=0.3,
        borderpad=0.3,
        columnspacing=1.0,
    )

"""Server-rendered inline SVG charts for the dashboard: no JavaScript, no external asset.

Each function returns :class:`markupsafe.Markup` (every text in it escaped here), which a template
inserts as is. Colours are SVG presentation attributes or CSS classes (``ui.css``), never inline
``style`` attributes, so the pages work under a strict Content-Security-Policy.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

# Series colours (the first ones are backend.model.overlay.CLASS_COLOURS, as the overlays draw classes).
PALETTE = ("#d4a600", "#dc143c", "#1e90ff", "#32cd32", "#ba55d3", "#ff8c00")
MAIN = "#1f3b73"


@dataclass(frozen=True)
class Point:
    """One model version on a chart."""

    key: str  # the version uid (``data-version``)
    x: float  # seconds since the epoch, or a count
    y: float | None  # None: the version has no value of the metric (drawn hollow on the axis)
    label: str  # tooltip
    serving: bool = False
    status: str = ""
    series: tuple[float | None, ...] = ()  # one value per extra series (per-class Dice)


def _fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if abs(v - round(v)) > 1e-9 else str(round(v))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _time_label(seconds: float, span: float) -> str:
    t = dt.datetime.fromtimestamp(seconds, dt.UTC)
    if span > 2 * 86400:
        return t.strftime("%Y-%m-%d")
    if span > 3600:
        return t.strftime("%m-%d %H:%M")
    return t.strftime("%H:%M:%S")


def scatter(
    points: Sequence[Point],
    *,
    title: str,
    x_label: str,
    y_label: str,
    time_axis: bool,
    series_names: Sequence[str] = (),
    css_id: str = "",
    width: int = 760,
    height: int = 280,
) -> Markup:
    """Points over x (time or a count), y in [0, 1]; one ``circle.version-point`` per point, the
    serving one ringed; extra series (per-class values) as small squares and dashed lines."""
    left, right, top, bottom = 52, 150 if series_names else 20, 26, 44
    pw, ph = width - left - right, height - top - bottom
    out = [
        f'<svg class="chart scatter" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        + (f' id="{escape(css_id)}"' if css_id else "")
        + f' data-points="{len(points)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{left}" y="16">{escape(title)}</text>',
    ]
    if not points:
        out.append(
            f'<text class="empty" x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">no versions yet</text>'
        )
        out.append("</svg>")
        return Markup("".join(out))
    xs = [p.x for p in points]
    lo, hi = min(xs), max(xs)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.04
    lo, hi = lo - pad, hi + pad

    def sx(x: float) -> float:
        return round(left + (x - lo) / (hi - lo) * pw, 2)

    def sy(y: float) -> float:
        return round(top + (1 - max(0.0, min(1.0, y))) * ph, 2)

    # axes and grid
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = sy(t)
        out.append(f'<line class="grid" x1="{left}" y1="{y}" x2="{left + pw}" y2="{y}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{y + 4}" text-anchor="end">{t:.2f}</text>')
    span = hi - lo
    ticks = [lo + span * i / 4 for i in range(5)] if time_axis else [t for t in _nice_ticks(lo, hi) if lo <= t <= hi]
    for t in ticks:
        x = sx(t)
        text = _time_label(t, span) if time_axis else _fmt(t)
        out.append(f'<line class="axis" x1="{x}" y1="{top + ph}" x2="{x}" y2="{top + ph + 4}"/>')
        out.append(f'<text class="tick" x="{x}" y="{top + ph + 16}" text-anchor="middle">{escape(text)}</text>')
    out.append(f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>')
    out.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>')
    out.append(
        f'<text class="axis-label" x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>'
    )
    out.append(
        f'<text class="axis-label" x="14" y="{top + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2})">{escape(y_label)}</text>'
    )

    ordered = sorted(points, key=lambda p: p.x)
    # extra series first, so the main points stay on top
    for i, name in enumerate(series_names):
        colour = PALETTE[i % len(PALETTE)]
        pts = [(sx(p.x), sy(v)) for p in ordered if i < len(p.series) and (v := p.series[i]) is not None]
        if len(pts) > 1:
            path = " ".join(f"{x},{y}" for x, y in pts)
            out.append(f'<polyline class="series-line" fill="none" stroke="{colour}" points="{path}"/>')
        for p in ordered:
            v = p.series[i] if i < len(p.series) else None
            if v is None:
                continue
            out.append(
                f'<rect class="class-point" data-version="{escape(p.key)}" data-class="{escape(name)}" '
                f'x="{sx(p.x) - 3}" y="{sy(v) - 3}" width="6" height="6" fill="{colour}">'
                f"<title>{escape(name)}: {v:.3f} ({escape(p.key)})</title></rect>"
            )
        ly = top + 14 + i * 18
        out.append(f'<rect x="{left + pw + 14}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text class="legend" x="{left + pw + 30}" y="{ly + 1}">{escape(name)} Dice</text>')
    if series_names:
        ly = top + 14 + len(series_names) * 18
        out.append(f'<circle cx="{left + pw + 19}" cy="{ly - 3}" r="5" fill="{MAIN}"/>')
        out.append(f'<text class="legend" x="{left + pw + 30}" y="{ly + 1}">{escape(y_label)}</text>')

    main = [(sx(p.x), sy(p.y)) for p in ordered if p.y is not None]
    if len(main) > 1:
        out.append(
            f'<polyline class="main-line" fill="none" stroke="{MAIN}" points="{" ".join(f"{x},{y}" for x, y in main)}"/>'
        )
    for p in ordered:
        cx, cy = sx(p.x), sy(p.y if p.y is not None else 0.0)
        classes = ["version-point", f"status-{p.status}" if p.status else ""]
        if p.serving:
            classes.append("serving")
            out.append(f'<circle class="serving-ring" cx="{cx}" cy="{cy}" r="10" fill="none" stroke="#0a7d32"/>')
            out.append(f'<text class="serving-label" x="{cx}" y="{cy - 14}" text-anchor="middle">serving</text>')
        if p.y is None:
            classes.append("no-metric")
        fill = "white" if p.y is None else MAIN
        out.append(
            f'<circle class="{" ".join(c for c in classes if c)}" data-version="{escape(p.key)}" '
            f'cx="{cx}" cy="{cy}" r="5" fill="{fill}" stroke="{MAIN}"><title>{escape(p.label)}</title></circle>'
        )
    out.append("</svg>")
    return Markup("".join(out))


def histogram(bins: Sequence[int], *, accepted_from: int, title: str, width: int = 300, height: int = 110) -> Markup:
    """Counts of correction Dice in ``len(bins)`` equal bins over [0, 1]; bins from ``accepted_from`` on are
    marked as accepted (nearly unchanged)."""
    left, right, top, bottom = 30, 8, 18, 22
    pw, ph = width - left - right, height - top - bottom
    n = max(1, len(bins))
    peak = max([*bins, 1])
    out = [
        f'<svg class="chart histogram" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'data-total="{sum(bins)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<text class="tick" x="{left - 4}" y="{top + 4}" text-anchor="end">{peak}</text>',
        f'<text class="tick" x="{left - 4}" y="{top + ph}" text-anchor="end">0</text>',
    ]
    bw = pw / n
    for i, count in enumerate(bins):
        h = ph * count / peak
        cls = "bar accepted" if i >= accepted_from else "bar"
        lo, hi = i / n, (i + 1) / n
        out.append(
            f'<rect class="{cls}" x="{round(left + i * bw + 0.5, 2)}" y="{round(top + ph - h, 2)}" '
            f'width="{round(max(bw - 1, 1), 2)}" height="{round(h, 2)}">'
            f"<title>Dice {lo:.2f}-{hi:.2f}: {count}</title></rect>"
        )
    out.append(f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>')
    for t in (0.0, 0.5, 1.0):
        out.append(f'<text class="tick" x="{left + t * pw}" y="{height - 6}" text-anchor="middle">{t:g}</text>')
    out.append("</svg>")
    return Markup("".join(out))


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    text: str  # what is written next to the bar


def bars(rows: Sequence[Bar], *, title: str, width: int = 520, row_height: int = 22) -> Markup:
    """Horizontal bars, one per row, scaled to the largest value."""
    left, right, top = 130, 90, 22
    height = top + row_height * max(1, len(rows)) + 6
    pw = width - left - right
    peak = max([r.value for r in rows] + [0.0]) or 1.0
    out = [
        f'<svg class="chart bars" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="0" y="14">{escape(title)}</text>',
    ]
    for i, r in enumerate(rows):
        y = top + i * row_height
        w = round(pw * max(r.value, 0.0) / peak, 2)
        colour = PALETTE[i % len(PALETTE)]
        out.append(f'<text class="legend" x="{left - 8}" y="{y + 14}" text-anchor="end">{escape(r.label)}</text>')
        out.append(
            f'<rect class="bar" x="{left}" y="{y + 3}" width="{w}" height="{row_height - 8}" fill="{colour}">'
            f"<title>{escape(r.label)}: {escape(r.text)}</title></rect>"
        )
        out.append(f'<text class="legend" x="{left + w + 6}" y="{y + 14}">{escape(r.text)}</text>')
    out.append("</svg>")
    return Markup("".join(out))

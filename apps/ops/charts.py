"""Server-rendered SVG line charts for the dashboard: polylines, no chart library."""

from __future__ import annotations

from collections.abc import Sequence

CHART_WIDTH = 600
CHART_HEIGHT = 120


def _segments(values: Sequence[float | None], top: float, step: float) -> list[str]:
    """Polyline point strings; a gap (None: no data that minute) breaks the line."""
    segments: list[str] = []
    points: list[str] = []
    for i, value in enumerate(values):
        if value is None:
            if points:
                segments.append(" ".join(points))
            points = []
            continue
        points.append(f"{i * step:.1f},{CHART_HEIGHT * (1 - value / top):.1f}")
    if points:
        segments.append(" ".join(points))
    # A lone point draws nothing as a polyline: repeat it, so it shows as a dot.
    return [s if " " in s else f"{s} {s}" for s in segments]


def line_chart(series: dict[str, Sequence[float | None]]) -> dict:
    """``{css class: values}`` → what templates/core/_chart.html draws. The y axis starts
    at 0 and ends at the largest value (at least 1, so a flat zero line sits at the
    bottom)."""
    present = [v for values in series.values() for v in values if v is not None]
    top = max([*present, 0.0]) or 1.0
    length = max((len(v) for v in series.values()), default=0)
    step = CHART_WIDTH / max(1, length - 1)
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "top": top,
        "lines": [
            {"name": name, "segments": _segments(values, top, step)}
            for name, values in series.items()
        ],
    }

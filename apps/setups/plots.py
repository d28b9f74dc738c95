"""The trials comparison plot: decode speed against memory, one point per trial, with
quality shown where an evaluation exists. Drawn as inline SVG on the server (no script),
so it prints and works without JavaScript."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apps.setups.models import Trial

WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 48


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str
    title: str


@dataclass(frozen=True)
class Plot:
    width: int
    height: int
    points: list[Point]
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    x_label: str
    y_label: str


def _ticks(high: float, count: int = 4) -> list[float]:
    step = high / count
    return [step * i for i in range(count + 1)]


def trial_plot(trials: Sequence[Trial]) -> Plot | None:
    """Decode tokens/s (one stream) against peak RAM (MiB); None with nothing measured."""
    measured = [t for t in trials if t.decode_tps_single and t.peak_ram_bytes]
    if not measured:
        return None
    max_x = max(t.peak_ram_bytes for t in measured) / 2**20 * 1.1
    max_y = max(t.decode_tps_single for t in measured) * 1.1
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(v: float) -> float:
        return LEFT + inner_w * v / max_x

    def sy(v: float) -> float:
        return TOP + inner_h * (1 - v / max_y)

    points = [
        Point(
            sx(t.peak_ram_bytes / 2**20),
            sy(t.decode_tps_single),
            t.setup.name,
            f"{t.setup.name} (trial {t.pk}): {t.decode_tps_single:.1f} tokens/s, "
            f"{t.peak_ram_bytes / 2**20:,.0f} MiB, TTFT p50 {t.ttft_p50_ms or 0:.0f} ms, "
            f"on {t.hardware_class or t.worker}",
        )
        for t in measured
    ]
    return Plot(
        WIDTH,
        HEIGHT,
        points,
        [(sx(v), f"{v:,.0f}") for v in _ticks(max_x)],
        [(sy(v), f"{v:,.0f}") for v in _ticks(max_y)],
        "peak RAM (MiB)",
        "decode tokens/s (1 stream)",
    )

"""Grouped bar charts as PNG with Pillow only (the demo and the benchmarks; no plotting library needed)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#c0392b", "#2e86c1", "#28b463", "#8e44ad", "#d68910", "#17a589", "#7f8c8d"]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def bar_chart(path: str | Path, groups: list[str], series: list[tuple[str, list[float | None]]], *,
              title: str = "", ylabel: str = "", limit: float | None = None, limit_label: str = "",
              ymax: float = 1.0, percent: bool = True) -> Path:
    """Write a grouped bar chart: one group per entry of ``groups``, one coloured bar per series in each group.

    Values are fractions of ``ymax`` (None draws no bar, labelled "n/a"); ``limit`` draws a dashed line.
    """
    font, small, big = _font(14), _font(12), _font(17)
    bar, gap, group_gap = 26, 4, 34
    group_width = len(series) * (bar + gap) - gap
    left, right, top, bottom = 70, 20, 70 + 20 * ((len(series) + 3) // 4), 64
    plot_h = 300
    width = max(left + right + len(groups) * (group_width + group_gap), 480)
    height = top + plot_h + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill="black", font=big)
    for index, (name, _) in enumerate(series):  # legend, four entries per row
        x0, y0 = left + (index % 4) * 150, 38 + 20 * (index // 4)
        draw.rectangle([x0, y0 + 2, x0 + 12, y0 + 14], fill=PALETTE[index % len(PALETTE)])
        draw.text((x0 + 18, y0), name, fill="black", font=small)

    def y_of(value: float) -> float:
        return top + plot_h * (1 - min(max(value / ymax, 0.0), 1.0))

    for tick in range(5):
        value = ymax * tick / 4
        y = y_of(value)
        draw.line([left, y, width - right, y], fill="#e5e5e5")
        label = f"{100 * value:.0f}%" if percent else f"{value:g}"
        draw.text((left - 8 - _text_width(draw, label, small), y - 7), label, fill="black", font=small)
    draw.line([left, top, left, top + plot_h], fill="black")
    draw.line([left, top + plot_h, width - right, top + plot_h], fill="black")
    if ylabel:
        draw.text((8, top - 22), ylabel, fill="black", font=small)
    for g, group in enumerate(groups):
        x_group = left + group_gap // 2 + g * (group_width + group_gap)
        for s, (_, values) in enumerate(series):
            value = values[g] if g < len(values) else None
            x0 = x_group + s * (bar + gap)
            if value is None or math.isnan(value):
                draw.text((x0 + 2, top + plot_h - 16), "n/a", fill="#777777", font=small)
                continue
            draw.rectangle([x0, y_of(value), x0 + bar, top + plot_h], fill=PALETTE[s % len(PALETTE)])
            label = f"{100 * value:.0f}" if percent else f"{value:.2g}"
            draw.text((x0 + (bar - _text_width(draw, label, small)) / 2, y_of(value) - 15), label, fill="black",
                      font=small)
        text_w = _text_width(draw, group, font)
        draw.text((x_group + (group_width - text_w) / 2, top + plot_h + 8), group, fill="black", font=font)
    if limit is not None:
        y = y_of(limit)
        for x in range(left, width - right, 12):
            draw.line([x, y, min(x + 6, width - right), y], fill="black", width=2)
        if limit_label:
            draw.text((width - right - _text_width(draw, limit_label, small), y - 16), limit_label, fill="black",
                      font=small)
    path = Path(path)
    image.save(path)
    return path

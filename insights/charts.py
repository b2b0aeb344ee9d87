"""A report drawn as a PNG or SVG file with matplotlib (Agg: no display needed).

The report's `Chart` says how, the same description the web page draws from.
Generalised rows (small segments merged until they reach k owners) are drawn hatched
(bars, heat-map cells) or as hollow markers off the lines, under their labels; on the
heat map a merged row fills its member cells with its value shared equally among them
(events per cell, so the colour scale stays that of one cell), and suppressed cells are
grey. Suppressed rows are left out of the other charts; every chart's footnote counts
the segments generalised and suppressed, with k.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

from schemas.errors import UsagepipeError

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from insights.generalise import Row, Scalar
from insights.specs import Report

FORMATS = (".png", ".svg")
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MAX_BARS = 40
_HATCH = "///"


class ChartError(UsagepipeError, ValueError):
    """The chart cannot be written (an unsupported file type)."""


def write_chart(report: Report, path: Path) -> int:
    """Draw `report` into `path` (.png or .svg); returns how many segments it shows."""
    if path.suffix.lower() not in FORMATS:
        raise ChartError(f"--chart: {path.name!r} must end in .png or .svg")
    shown = [r for r in report.rows if r.suppressed is None]
    fig = draw(report, shown)
    try:
        kind = path.suffix.lower()[1:]
        # No creation date in an SVG: the same report gives the same file.
        fig.savefig(path, format=kind, dpi=110, metadata={"Date": None} if kind == "svg" else None)
    finally:
        plt.close(fig)
    return len(shown)


def draw(report: Report, shown: list[Row]) -> Figure:
    chart = report.spec.chart
    fig, ax = plt.subplots(figsize=(11, 6.5))
    if not shown:
        ax.text(0.5, 0.5, "no segment to show", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    elif chart.kind == "heatmap":
        _heatmap(fig, ax, report, shown)
    elif chart.kind == "line":
        _lines(ax, report, shown)
    else:
        _bars(ax, report, shown)
    ax.set_title(report.spec.title)
    f = report.filters
    merged = report.generalised_segments
    generalised = (
        f"{merged} segment(s) generalised into {report.generalised_rows} row(s) "
        f"({'hatched' if chart.kind != 'line' else 'hollow markers'}); "
        if merged
        else ""
    )
    fig.text(
        0.01,
        0.01,
        f"{f.start:%Y-%m-%d %H:%M} to {f.end:%Y-%m-%d %H:%M} UTC; k = {report.k}: "
        f"{generalised}{report.suppressed_segments} segment(s) with fewer than {report.k} "
        "owners suppressed",
        fontsize="small",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def _heatmap(fig: Figure, ax: Axes, report: Report, shown: list[Row]) -> None:
    chart = report.spec.chart
    grid = [[0.0] * 24 for _ in range(7)]
    merged: list[tuple[int, int]] = []
    for r in shown:
        cells = [dict(m) for m in r.members] or [r.segment]
        value = float(_num(r.values[chart.value])) / len(cells)
        for cell in cells:
            y, x = _int(cell[chart.y or ""]) - 1, _int(cell[chart.x or ""])
            grid[y][x] = value
            if r.members:
                merged.append((y, x))
    for r in report.rows:
        if r.suppressed:  # withheld, not zero: drawn grey
            for cell in [dict(m) for m in r.members] or [r.segment]:
                grid[_int(cell[chart.y or ""]) - 1][_int(cell[chart.x or ""])] = float("nan")
    colours = matplotlib.colormaps["YlOrRd"].with_extremes(bad="lightgrey")
    image = ax.imshow(grid, aspect="auto", cmap=colours)
    for y, x in merged:
        ax.add_patch(
            Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch=_HATCH, edgecolor="grey", lw=0)
        )
    ax.set_xticks(range(24))
    ax.set_yticks(range(7), WEEKDAYS)
    ax.set_xlabel(f"hour ({report.options.get('tz', 'UTC')})")
    label = chart.value + (" (merged cells hatched: their total shared equally)" if merged else "")
    fig.colorbar(image, ax=ax, label=label)


def _lines(ax: Axes, report: Report, shown: list[Row]) -> None:
    chart = report.spec.chart
    x_of = chart.x or ""
    fine = [r for r in shown if not r.members]
    merged = [r for r in shown if r.members]
    # One x axis for every series, in order (a series may lack some x values); the
    # labels of generalised rows ("weeks of 2026-11") after the fine values.
    ticks = sorted({str(r.segment[x_of]) for r in fine})
    ticks += sorted({str(r.segment[x_of]) for r in merged} - set(ticks))
    position = {x: i for i, x in enumerate(ticks)}
    colours: dict[str, Any] = {}
    for name, unsorted in _series(fine, chart.series).items():
        rows = sorted(unsorted, key=lambda r: position[str(r.segment[x_of])])
        xs = [position[str(r.segment[x_of])] for r in rows]
        (line,) = ax.plot(xs, [_num(r.values[chart.value]) for r in rows], marker="o", label=name)
        colours[name] = line.get_color()
    for name, rows in _series(merged, chart.series).items():
        xs = [position[str(r.segment[x_of])] for r in rows]
        ax.plot(
            xs,
            [_num(r.values[chart.value]) for r in rows],
            linestyle="none",
            marker="o",
            markerfacecolor="none",
            markersize=9,
            color=colours.get(name),
            label=f"{name} (merged)".strip() if name else "merged segments",
        )
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel(x_of)
    ax.set_ylabel(chart.value)
    ax.tick_params(axis="x", labelrotation=45)
    if chart.series or merged:
        ax.legend(fontsize="small")


def _bars(ax: Axes, report: Report, shown: list[Row]) -> None:
    chart = report.spec.chart
    groups = _series(shown, chart.series)
    labels: list[str] = []
    for rows in groups.values():
        for r in rows:
            label = _label(r, chart.label)
            if label not in labels:
                labels.append(label)
    if all(_is_number(x) for x in labels):
        labels.sort(key=float)
    elif all(x[:1].isdigit() or x.startswith("other") for x in labels):
        labels.sort(key=_leading_number)  # cycles: 0, 1, 2, "8-13", "14+", "other counts"
    labels = labels[:_MAX_BARS]
    width = 0.8 / max(len(groups), 1)
    any_merged = False
    legend: list[Patch] = []  # plain patches: a series' first bar may be hatched
    for i, (name, rows) in enumerate(groups.items()):
        heights = dict.fromkeys(labels, 0.0)
        merged = dict.fromkeys(labels, False)
        for r in rows:
            label = _label(r, chart.label)
            if label in heights:
                heights[label] = float(_num(r.values[chart.value]))
                merged[label] = bool(r.members)
        xs = [j + i * width for j in range(len(labels))]
        bars = ax.bar(xs, list(heights.values()), width=width)
        legend.append(Patch(facecolor=bars.patches[0].get_facecolor(), label=name))
        for bar, is_merged in zip(bars, merged.values(), strict=True):
            if is_merged:
                bar.set_hatch(_HATCH)
                bar.set_edgecolor("black")
                any_merged = True
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=45, ha="right"
    )
    ax.set_ylabel(chart.value)
    if not chart.series:
        legend = []
    if any_merged:
        legend.append(
            Patch(facecolor="white", edgecolor="black", hatch=_HATCH, label="merged segments")
        )
    if legend:
        ax.legend(handles=legend, fontsize="small")


def _label(row: Row, dimensions: tuple[str, ...]) -> str:
    return " ".join(str(row.segment[d]) for d in dimensions)


def _leading_number(text: str) -> tuple[float, str]:
    digits = ""
    for ch in text:
        if not ch.isdigit():
            break
        digits += ch
    return (float(digits) if digits else float("inf"), text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _series(rows: list[Row], by: str | None) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(str(r.segment[by]) if by else "", []).append(r)
    return out


def _num(value: Scalar) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _int(value: Scalar) -> int:
    return int(value) if isinstance(value, int | float) else 0

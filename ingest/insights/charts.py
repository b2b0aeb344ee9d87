"""A report drawn as a PNG or SVG file with matplotlib (Agg: no display needed).

The report's `Chart` says how, the same description the web page draws from. Suppressed
segments are left out of the picture and counted in its footnote, with k.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ingest.insights.reports import Report, Row, Scalar

FORMATS = (".png", ".svg")
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MAX_BARS = 40


class ChartError(ValueError):
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
        grid = [[0.0] * 24 for _ in range(7)]
        for r in shown:
            grid[_int(r.segment[chart.y or ""]) - 1][_int(r.segment[chart.x or ""])] = float(
                _num(r.values[chart.value])
            )
        image = ax.imshow(grid, aspect="auto", cmap="YlOrRd")
        ax.set_xticks(range(24))
        ax.set_yticks(range(7), WEEKDAYS)
        ax.set_xlabel(f"hour ({report.options.get('tz', 'UTC')})")
        fig.colorbar(image, ax=ax, label=chart.value)
    elif chart.kind == "line":
        # One x axis for every series, in order (a series may lack some x values).
        ticks = sorted({str(r.segment[chart.x or ""]) for r in shown})
        position = {x: i for i, x in enumerate(ticks)}
        for name, unsorted in _series(shown, chart.series).items():
            rows = sorted(unsorted, key=lambda r: str(r.segment[chart.x or ""]))
            xs = [position[str(r.segment[chart.x or ""])] for r in rows]
            ax.plot(xs, [_num(r.values[chart.value]) for r in rows], marker="o", label=name)
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_xlabel(chart.x or "")
        ax.set_ylabel(chart.value)
        ax.tick_params(axis="x", labelrotation=45)
        if chart.series:
            ax.legend(fontsize="small")
    else:
        _bars(ax, report, shown)
    suppressed = len(report.rows) - len(shown)
    ax.set_title(report.spec.title)
    f = report.filters
    fig.text(
        0.01,
        0.01,
        f"{f.start:%Y-%m-%d %H:%M} to {f.end:%Y-%m-%d %H:%M} UTC; "
        f"{suppressed} segment(s) with fewer than {report.k} owners suppressed",
        fontsize="small",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def _bars(ax: Axes, report: Report, shown: list[Row]) -> None:
    chart = report.spec.chart
    groups = _series(shown, chart.series)
    labels: list[str] = []
    for rows in groups.values():
        for r in rows:
            label = " ".join(str(r.segment[d]) for d in chart.label)
            if label not in labels:
                labels.append(label)
    if all(_is_number(x) for x in labels):
        labels.sort(key=float)
    labels = labels[:_MAX_BARS]
    width = 0.8 / max(len(groups), 1)
    for i, (name, rows) in enumerate(groups.items()):
        heights = dict.fromkeys(labels, 0.0)
        for r in rows:
            label = " ".join(str(r.segment[d]) for d in chart.label)
            if label in heights:
                heights[label] = float(_num(r.values[chart.value]))
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, list(heights.values()), width=width, label=name)
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=45, ha="right"
    )
    ax.set_ylabel(chart.value)
    if chart.series:
        ax.legend(fontsize="small")


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

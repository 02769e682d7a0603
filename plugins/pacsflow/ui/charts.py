"""Charts as inline SVG rendered on the server: no JavaScript, no CDN (hospital networks are offline).

Every label passes through Jinja2's escaping (``Markup.format``), so a value from the audit cannot inject markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from markupsafe import Markup

PALETTE = {
    "retrieved": "#2f7d32",
    "filtered": "#8c8c8c",
    "not_found": "#c77c02",
    "failed": "#c62828",
    "complete": "#2f7d32",
    "partial": "#c77c02",
    "dropped": "#8c8c8c",
    "pending": "#5c6bc0",
}
DEFAULT_COLOUR = "#3f6fb5"
STATE_COLOURS = {"success": DEFAULT_COLOUR, "failed": "#c62828", "running": "#c77c02"}
WIDTH = 560
BAR_HEIGHT = 22
LABEL_WIDTH = 190


def bar_chart(values: Mapping[str, int | float], *, title: str, unit: str = "") -> Markup:
    """Horizontal bars, one per label, with the value written after each bar."""
    items = [(str(label), value) for label, value in values.items()]
    height = max(1, len(items)) * (BAR_HEIGHT + 6) + 30
    largest = max((v for _, v in items), default=0) or 1
    span = WIDTH - LABEL_WIDTH - 70
    parts = [
        Markup(
            '<svg class="chart" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
            'xmlns="http://www.w3.org/2000/svg"><title>{t}</title>'
            '<text x="0" y="14" class="chart-title">{t}</text>'
        ).format(w=WIDTH, h=height, t=title)
    ]
    for index, (label, value) in enumerate(items):
        y = 26 + index * (BAR_HEIGHT + 6)
        length = max(1.0, span * value / largest) if value else 0
        parts.append(
            Markup(
                '<text x="{lx}" y="{ty}" text-anchor="end" class="chart-label">{label}</text>'
                '<rect x="{x}" y="{y}" width="{len:.1f}" height="{bh}" fill="{colour}"><title>{label}: {value}</title>'
                '</rect><text x="{vx:.1f}" y="{ty}" class="chart-value">{value}{unit}</text>'
            ).format(
                lx=LABEL_WIDTH - 8,
                ty=y + BAR_HEIGHT - 6,
                label=label,
                x=LABEL_WIDTH,
                y=y,
                len=length,
                bh=BAR_HEIGHT,
                colour=PALETTE.get(label, DEFAULT_COLOUR),
                vx=LABEL_WIDTH + length + 6,
                value=_number(value),
                unit=unit,
            )
        )
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)


def timeline(stages: Sequence[Mapping[str, Any]], *, title: str) -> Markup:
    """A Gantt chart of the run's stage attempts (one row each, in start order, coloured by how they ended) and,
    under it, the throughput of each retrieval attempt (MB/s over its duration) on the same time axis."""
    if not stages:
        return Markup('<p class="muted">No stage events recorded.</p>')
    start = min(s["started_at"] for s in stages)
    end = max(s["finished_at"] for s in stages)
    total = max((end - start).total_seconds(), 1e-3)
    span = WIDTH - LABEL_WIDTH - 20
    rows = len(stages)
    gantt_height = 30 + rows * 18
    rate_height = 90
    height = gantt_height + rate_height + 30

    def x(moment: datetime) -> float:
        return LABEL_WIDTH + span * (moment - start).total_seconds() / total

    parts = [
        Markup(
            '<svg class="chart" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
            'xmlns="http://www.w3.org/2000/svg"><title>{t}</title>'
            '<text x="0" y="14" class="chart-title">{t}</text>'
        ).format(w=WIDTH, h=height, t=title)
    ]
    for index, stage in enumerate(stages):
        y = 24 + index * 18
        left, right = x(stage["started_at"]), x(stage["finished_at"])
        seconds = (stage["finished_at"] - stage["started_at"]).total_seconds()
        parts.append(
            Markup(
                '<text x="{lx}" y="{ty}" text-anchor="end" class="chart-label">{name}</text>'
                '<rect x="{x:.1f}" y="{y}" width="{wd:.1f}" height="14" fill="{c}"><title>{name}: {state}, {s:.1f} s'
                "</title></rect>"
            ).format(
                lx=LABEL_WIDTH - 8,
                ty=y + 11,
                name=stage["label"],
                x=left,
                y=y,
                wd=max(right - left, 1.5),
                c=STATE_COLOURS.get(stage.get("state", ""), DEFAULT_COLOUR),
                state=stage.get("state"),
                s=seconds,
            )
        )
    rates = [(stage, rate) for stage in stages if (rate := _rate(stage)) is not None]
    base = gantt_height + rate_height
    top_rate = max((r for _, r in rates), default=0) or 1
    parts.append(
        Markup(
            '<text x="{lx}" y="{y}" text-anchor="end" class="chart-label">MB/s (retrieval)</text>'
            '<line x1="{x0}" y1="{b}" x2="{x1}" y2="{b}" stroke="#999"/>'
            '<text x="{x0}" y="{ly}" class="chart-value">0 s</text>'
            '<text x="{x1}" y="{ly}" text-anchor="end" class="chart-value">{total:.1f} s</text>'
            '<text x="{lx}" y="{ty}" text-anchor="end" class="chart-value">{top:.1f}</text>'
        ).format(
            lx=LABEL_WIDTH - 8,
            y=base - rate_height / 2,
            x0=LABEL_WIDTH,
            x1=LABEL_WIDTH + span,
            b=base,
            ly=base + 16,
            total=total,
            ty=gantt_height + 12,
            top=top_rate,
        )
    )
    for stage, rate in rates:
        left, right = x(stage["started_at"]), x(stage["finished_at"])
        bar = (rate_height - 10) * rate / top_rate
        parts.append(
            Markup(
                '<rect x="{x:.1f}" y="{y:.1f}" width="{wd:.1f}" height="{h:.1f}" fill="#2f7d32" '
                'opacity="0.7"><title>{name}: {r:.2f} MB/s</title></rect>'
            ).format(x=left, y=base - bar, wd=max(right - left, 1.5), h=bar, name=stage["label"], r=rate)
        )
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)


def _rate(stage: Mapping[str, Any]) -> float | None:
    counts = stage.get("counts") or {}
    if "bytes_fetched" not in counts:
        return None
    seconds = (stage["finished_at"] - stage["started_at"]).total_seconds()
    return counts["bytes_fetched"] / 1e6 / seconds if seconds > 0 else None


def _number(value: int | float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"

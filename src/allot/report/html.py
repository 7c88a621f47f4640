"""`report.html`: the report's plots in one self-contained page (inline SVG, no scripts, nothing
fetched), beside `report.md`: the per-layer scheme map, the allocator's Pareto curve with the
chosen plan marked, and the plan's predicted against measured loss changes.

The SVG is drawn here, so the page needs no plotting library.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from allot.files import atomic_write
from allot.plan import Plan

REPORT_HTML = "report.html"
WIDTH, HEIGHT = 720, 300
MARGIN = {"left": 64, "right": 16, "top": 28, "bottom": 60}
COLOURS = {
    "quant": "#3b6ea8",
    "rank": "#d98c20",
    "grouped": "#b5651d",
    "sparse": "#3a9a5b",
    "sum": "#8e5ea2",
    "keep": "#999999",
}
OTHER_COLOUR = "#c0392b"
STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
svg { background: #fff; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def write_html(plan: Plan, evaluation: dict[str, dict[str, Any]], directory: Path) -> Path:
    """Write `report.html` into `directory` and return its path."""
    body = [
        f"<h1>allot report: {_e(plan.model)}</h1>",
        f"<p>Method <b>{_e(plan.method)}</b> (error model <code>{_e(plan.error_model)}</code>, "
        f"allocator <code>{_e(plan.metadata.get('allocator', '?'))}</code>), budget "
        f"{_e(plan.budget.describe())}. {plan.n_weights:,} compressible weights in "
        f"{plan.weight_bits:,} bits ({plan.weight_bits / plan.n_weights:.3f} bits/weight, ratio "
        f"{plan.ratio:.2f}x).</p>",
        "<h2>Evaluation</h2>",
        _evaluation_table(evaluation),
        "<h2>Per-layer scheme map</h2>",
        _scheme_map(plan),
        _layer_table(plan),
        "<h2>Pareto curve</h2>",
        _pareto(plan),
        "<h2>Predicted against measured loss change</h2>",
        _prediction(plan.metadata.get("prediction")),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>allot report: {_e(plan.model)}</title><style>{STYLE}</style></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = Path(directory) / REPORT_HTML
    atomic_write(path, page.encode())
    return path


def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return _e(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_number(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _evaluation_table(evaluation: dict[str, dict[str, Any]]) -> str:
    if not evaluation:
        return '<p class="note">No evaluation was recorded.</p>'
    keys = list(dict.fromkeys(k for metrics in evaluation.values() for k in metrics))
    return _table(
        ["model", *keys],
        [[label, *(m.get(k, "") for k in keys)] for label, m in evaluation.items()],
    )


def _layer_table(plan: Plan) -> str:
    return _table(
        ["layer", "kind", "weight shape", "scheme", "bits/weight", "damage"],
        [
            [
                layer.name,
                layer.spec.kind,
                "x".join(map(str, layer.spec.weight_shape)),
                layer.scheme.label(),
                round(layer.cost_bits / layer.spec.numel, 3),
                "" if layer.damage is None else float(layer.damage),
            ]
            for layer in plan.layers
        ],
    )


class _Axis:
    """A linear or log10 map from data values to pixels."""

    def __init__(self, low: float, high: float, start: float, end: float, log: bool) -> None:
        self.log = log
        low, high = (math.log10(low), math.log10(high)) if log else (low, high)
        if high <= low:
            low, high = low - 1, high + 1
        self.low, self.high, self.start, self.end = low, high, start, end

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.start + (v - self.low) / (self.high - self.low) * (self.end - self.start)

    def ticks(self) -> list[float]:
        if self.log:
            return [10.0**k for k in range(math.ceil(self.low), math.floor(self.high) + 1)]
        step = 10 ** math.floor(math.log10((self.high - self.low) / 4 or 1))
        for factor in (1, 2, 5, 10):
            if (self.high - self.low) / (step * factor) <= 6:
                step *= factor
                break
        first = math.ceil(self.low / step) * step
        return [first + i * step for i in range(int((self.high - first) / step) + 1)]


def _svg(content: list[str], title: str, xlabel: str, ylabel: str) -> str:
    left, bottom = MARGIN["left"], HEIGHT - MARGIN["bottom"]
    frame = [
        f'<text x="{WIDTH / 2:.0f}" y="18" text-anchor="middle" font-size="13">{_e(title)}</text>',
        f'<line x1="{left}" y1="{bottom}" x2="{WIDTH - MARGIN["right"]}" y2="{bottom}" stroke="#333"/>',
        f'<line x1="{left}" y1="{MARGIN["top"]}" x2="{left}" y2="{bottom}" stroke="#333"/>',
        f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle" font-size="11">{_e(xlabel)}</text>',
        f'<text x="14" y="{(MARGIN["top"] + bottom) / 2:.0f}" text-anchor="middle" font-size="11" '
        f'transform="rotate(-90 14 {(MARGIN["top"] + bottom) / 2:.0f})">{_e(ylabel)}</text>',
    ]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{_e(title)}">'
        + "".join(frame + content)
        + "</svg>"
    )


def _y_ticks(axis: _Axis, fmt: Callable[[float], str]) -> list[str]:
    left = MARGIN["left"]
    out = []
    for tick in axis.ticks():
        y = axis(tick)
        out.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>')
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{fmt(tick)}</text>'
        )
    return out


def _scheme_map(plan: Plan) -> str:
    """Bars of stored bits per weight per layer, coloured by scheme kind."""
    layers = plan.layers
    bits = [layer.cost_bits / layer.spec.numel for layer in layers]
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    bottom = HEIGHT - MARGIN["bottom"]
    y = _Axis(0.0, max(max(bits), 1.0), bottom, MARGIN["top"], log=False)
    slot = (right - left) / max(len(layers), 1)
    content = _y_ticks(y, lambda v: f"{v:g}")
    for i, (layer, value) in enumerate(zip(layers, bits, strict=True)):
        x = left + i * slot
        colour = COLOURS.get(layer.scheme.kind, OTHER_COLOUR)
        label = f"{layer.name}: {layer.scheme.label()}, {value:.3f} bits/weight"
        content.append(
            f'<rect class="layer" x="{x + 0.1 * slot:.1f}" y="{y(value):.1f}" '
            f'width="{0.8 * slot:.1f}" height="{bottom - y(value):.1f}" fill="{colour}">'
            f"<title>{_e(label)}</title></rect>"
        )
        if len(layers) <= 48:
            tx = x + slot / 2
            content.append(
                f'<text x="{tx:.1f}" y="{bottom + 8}" font-size="8" text-anchor="end" '
                f'transform="rotate(-60 {tx:.1f} {bottom + 8})">{_e(_short(layer.name))}</text>'
            )
    kinds = list(dict.fromkeys(layer.scheme.kind for layer in layers))
    for k, kind in enumerate(kinds):
        x = right - 90
        content.append(
            f'<rect x="{x}" y="{MARGIN["top"] + 14 * k}" width="10" height="10" '
            f'fill="{COLOURS.get(kind, OTHER_COLOUR)}"/><text x="{x + 14}" '
            f'y="{MARGIN["top"] + 9 + 14 * k}" font-size="10">{_e(kind)}</text>'
        )
    return _svg(content, f"{plan.method}: stored bits per weight by layer", "", "bits per weight")


def _short(name: str, size: int = 22) -> str:
    return name if len(name) <= size else "…" + name[-(size - 1) :]


def _pareto(plan: Plan) -> str:
    """The allocator's convex Pareto curve (predicted damage against bits per weight), with the
    chosen plan marked."""
    points = [(float(b), float(d)) for b, d in plan.metadata.get("pareto") or []]
    chosen = (plan.weight_bits / plan.n_weights, plan.damage)
    if not points or chosen[1] is None:
        return '<p class="note">The plan carries no Pareto curve (no predicted damage).</p>'
    damages = [d for _, d in points] + [chosen[1]]
    log_y = all(d > 0 for d in damages)
    x = _Axis(
        min(b for b, _ in [*points, chosen]),
        max(b for b, _ in [*points, chosen]),
        MARGIN["left"],
        WIDTH - MARGIN["right"],
        log=True,
    )
    y = _Axis(min(damages), max(damages), HEIGHT - MARGIN["bottom"], MARGIN["top"], log=log_y)
    path = " ".join(f"{x(b):.1f},{y(d):.1f}" for b, d in sorted(points))
    content = _y_ticks(y, lambda v: f"{v:.2g}")
    content.append(f'<polyline points="{path}" fill="none" stroke="#3b6ea8" stroke-width="1.5"/>')
    for b, d in points:
        content.append(
            f'<circle cx="{x(b):.1f}" cy="{y(d):.1f}" r="2" fill="#3b6ea8">'
            f"<title>{b:.3f} bits/weight, damage {d:.4g}</title></circle>"
        )
    cx, cy = x(chosen[0]), y(chosen[1])
    content.append(
        f'<circle id="chosen" cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="#c0392b">'
        f"<title>this plan: {chosen[0]:.3f} bits/weight, damage {chosen[1]:.4g}</title></circle>"
        f'<text x="{cx + 9:.1f}" y="{cy - 6:.1f}" font-size="11" fill="#c0392b">this plan</text>'
    )
    for tick in x.ticks():
        tx = x(tick)
        content.append(
            f'<text x="{tx:.1f}" y="{HEIGHT - MARGIN["bottom"] + 14}" font-size="10" '
            f'text-anchor="middle">{tick:g}</text>'
        )
    scale = "log" if log_y else "linear"
    return _svg(
        content,
        f"{plan.method}: size against predicted damage",
        "bits per weight (log scale)",
        f"predicted damage ({plan.error_model}, {scale})",
    )


def _prediction(prediction: dict[str, float | None] | None) -> str:
    """Bars of the second-order predictions of the plan's loss change beside its measured
    changes."""
    if not prediction:
        return (
            '<p class="note">No prediction check: the method\'s error model does not predict '
            "the loss change.</p>"
        )
    names = {
        "per_layer": "predicted, per layer",
        "joint": "predicted, joint",
        "measured_calibration": "measured, calibration",
        "measured_held_out": "measured, held-out",
    }
    values = {label: prediction.get(key) for key, label in names.items()}
    known = {k: float(v) for k, v in values.items() if v is not None}
    low, high = min([0.0, *known.values()]), max([0.0, *known.values()])
    y = _Axis(low, high if high > low else low + 1, HEIGHT - MARGIN["bottom"], MARGIN["top"], False)
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    slot = (right - left) / len(values)
    content = _y_ticks(y, lambda v: f"{v:.3g}")
    zero = y(0.0)
    content.append(
        f'<line x1="{left}" y1="{zero:.1f}" x2="{right}" y2="{zero:.1f}" stroke="#999"/>'
    )
    for i, (label, value) in enumerate(values.items()):
        x = left + i * slot
        colour = "#3b6ea8" if label.startswith("predicted") else "#3a9a5b"
        if value is not None:
            top, height = min(zero, y(value)), abs(zero - y(value))
            content.append(
                f'<rect class="check" x="{x + 0.2 * slot:.1f}" y="{top:.1f}" '
                f'width="{0.6 * slot:.1f}" height="{max(height, 0.5):.1f}" fill="{colour}">'
                f"<title>{_e(label)}: {value:.4g}</title></rect>"
            )
        shown = "not measured" if value is None else f"{value:.4g}"
        content.append(
            f'<text x="{x + slot / 2:.1f}" y="{HEIGHT - MARGIN["bottom"] + 16}" '
            f'font-size="10" text-anchor="middle">{_e(label)}: {shown}</text>'
        )
    return _svg(content, "loss change of the whole plan", "", "loss change (task-loss units)")

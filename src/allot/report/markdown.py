"""The markdown report written next to an artifact: summary, per-layer plan, plots.

Plots need matplotlib, the optional `plots` extra; without it the report is written without them
and says how to get them.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Any

from allot.exceptions import PlanError
from allot.files import atomic_write, write_json
from allot.plan import Plan
from allot.report.html import REPORT_HTML, write_html
from allot.sensitivity import Sensitivity

REPORT = "report.md"
ANALYSIS_FILES = frozenset({"analysis.md", "analysis.json", "curvature.png", "sensitivity.png"})
"""Every name `write_sensitivity` writes (what an analysis's --out may hold)."""
NO_PLOTS = "Plots need matplotlib: pip install 'allot[plots]'."


def _plots() -> ModuleType | None:
    """`allot.report.plots`, or None when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from allot.report import plots

    return plots


_PREDICTION = ("linear", "per_layer", "joint", "measured_calibration", "measured_held_out")
_GEOMETRY = (
    "eigenvectors",
    "top_error_share",
    "top_curvature_share",
    "negative_curvature",
    "saddle",
)


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def checked_metadata(plan: Plan) -> dict[str, Any]:
    """The metadata entries the report reads (prediction, geometry, pareto, notes), checked: a
    plan is untrusted, and a malformed entry gives `PlanError` naming it, not a traceback."""
    meta = plan.metadata
    prediction, geometry = meta.get("prediction"), meta.get("geometry")
    pareto, notes = meta.get("pareto"), meta.get("notes", [])
    if prediction is not None and not (
        isinstance(prediction, dict)
        and all(k in prediction and _number(prediction[k]) for k in _PREDICTION)
    ):
        raise PlanError(f"plan.metadata.prediction: expected numbers {', '.join(_PREDICTION)}")
    if geometry is not None and not (
        isinstance(geometry, dict)
        and all(
            isinstance(g, dict)
            and all(k in g for k in _GEOMETRY)
            and isinstance(g["saddle"], bool)
            and all(_number(g[k]) for k in _GEOMETRY[:-1])
            for g in geometry.values()
        )
    ):
        raise PlanError(f"plan.metadata.geometry: expected per layer {', '.join(_GEOMETRY)}")
    if pareto is not None and not (
        isinstance(pareto, list)
        and all(
            isinstance(p, list) and len(p) == 2 and all(_number(v) and v is not None for v in p)
            for p in pareto
        )
    ):
        raise PlanError("plan.metadata.pareto: expected [bits per weight, damage] pairs")
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise PlanError("plan.metadata.notes: expected a list of strings")
    layers = meta.get("layers") or {}
    if not (
        isinstance(layers, dict)
        and all(
            isinstance(c, dict) and all(_pair(c.get(k), int) for k in ("parameters", "macs"))
            for c in layers.values()
        )
    ):
        raise PlanError("plan.metadata.layers: expected per layer [before, after] parameters, MACs")
    checked = (prediction or {}).get("layers") or {}
    if not (
        isinstance(checked, dict)
        and all(
            isinstance(c, dict)
            and all(
                k in c and _number(c[k]) and c[k] is not None for k in ("predicted", "measured")
            )
            for c in checked.values()
        )
    ):
        raise PlanError("plan.metadata.prediction.layers: expected per layer predicted, measured")
    operator = meta.get("operator_error") or {}
    if not (
        isinstance(operator, dict)
        and all(
            isinstance(e, dict)
            and _number(e.get("measured"))
            and e.get("measured") is not None
            and _number(e.get("bound"))
            for e in operator.values()
        )
    ):
        raise PlanError("plan.metadata.operator_error: expected per layer measured, bound")
    families = meta.get("families") or {}
    if not (
        isinstance(families, dict)
        and all(
            isinstance(entry, dict)
            and all(isinstance(k, str) and (c is None or _alternative(c)) for k, c in entry.items())
            for entry in families.values()
        )
    ):
        raise PlanError(
            "plan.metadata.families: expected per layer and family a candidate "
            "{label, cost_bits, damage} or null"
        )
    screening = meta.get("screened") or {}
    if not (
        isinstance(screening, dict)
        and (not screening or _count(screening.get("margin")))
        and isinstance(screening.get("layers", {}), dict)
        and all(
            isinstance(e, dict) and all(_count(e.get(k)) for k in ("screened_out", "scored"))
            for e in screening.get("layers", {}).values()
        )
    ):
        raise PlanError(
            "plan.metadata.screened: expected a margin and per layer screened_out, scored counts"
        )
    return {
        "families": families,
        "screened": screening,
        "operator_error": operator,
        "prediction": prediction,
        "geometry": geometry,
        "pareto": pareto,
        "notes": notes,
        "layers": layers,
    }


def _alternative(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("label"), str)
        and isinstance(value.get("cost_bits"), int)
        and not isinstance(value.get("cost_bits"), bool)
        and value.get("damage") is not None
        and _number(value.get("damage"))
    )


def _count(value: Any) -> bool:
    """A finite number >= 0 (not a bool)."""
    return _number(value) and value is not None and math.isfinite(value) and value >= 0


def _pair(value: Any, kind: type) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def write_report(plan: Plan, evaluation: dict[str, dict[str, Any]], directory: Path) -> Path:
    """Write `report.md` and its plots, and the same plots in one page, `report.html`, into
    `directory`; `evaluation` maps a model label ("float", "compressed") to its metrics and
    sizes. Returns the markdown report's path."""
    directory = Path(directory)
    meta = checked_metadata(plan)
    write_html(plan, evaluation, directory)
    lines = [
        f"# allot report: {plan.model}",
        "",
        f"Method **{plan.method}** (error model `{plan.error_model}`, allocator "
        f"`{plan.metadata.get('allocator', '?')}`), budget {plan.budget.describe()}.",
        f"Compressible weights: {plan.n_weights:,}, stored in {plan.weight_bits:,} bits "
        f"({plan.weight_bits / plan.n_weights:.3f} bits/weight, ratio {plan.ratio:.2f}x).",
        "",
        "## Evaluation",
        "",
    ]
    keys = list(dict.fromkeys(k for metrics in evaluation.values() for k in metrics))
    lines += _table(
        ["model", *keys],
        [[label, *(m.get(k, "") for k in keys)] for label, m in evaluation.items()],
    )
    if any(m.get("held_out") == "not given" for m in evaluation.values()):
        lines += [
            "",
            "No held-out data was given, so held-out metrics were not measured and predictions "
            "are checked on the calibration data only; pass held-out data (`--held-out`, or "
            "`Data(evaluate=...)`) to measure them.",
        ]
    lines += ["", "## Per-layer plan", ""]
    operator = meta["operator_error"]
    lines += _layer_lines(
        plan, meta["layers"], (meta["prediction"] or {}).get("layers") or {}, operator
    )
    if operator:
        lines += [
            "",
            "*operator error*: the relative operator-norm error |W_hat - W|_2 / |W|_2 of each "
            "layer as fitted (before any refinement); *bound*: the bound its scheme states for it "
            "(ALDS: sqrt(k) max_i sigma_{j+1}(W_i) / sigma_1(W) for k groups at rank j).",
        ]
    lines += _family_lines(plan, meta["families"])
    lines += _screening_lines(meta["screened"])
    lines += _prediction_lines(meta["prediction"])
    lines += _geometry_lines(meta["geometry"])
    if plan.folded:
        lines += ["", "BatchNorm folded into: " + ", ".join(f"{c} <- {b}" for c, b in plan.folded)]
    if plan.skipped:
        lines += ["", "## Kept in float", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in plan.skipped.items()]
    for note in meta["notes"]:
        lines += ["", f"Note: {note}"]
    lines += ["", "## Plots", "", f"All plots in one page: [{REPORT_HTML}]({REPORT_HTML}).", ""]
    plots = _plots()
    if plots is None:
        lines += [NO_PLOTS]
    else:
        lines += [
            f"![allocation]({plots.allocation_plot(plan, directory / 'allocation.png').name})"
        ]
        damage = plots.damage_plot(plan, directory / "damage.png")
        if damage is not None:
            lines += ["", f"![damage]({damage.name})"]
        pareto = plots.pareto_plot(plan, directory / "pareto.png")
        if pareto is not None:
            lines += ["", f"![pareto]({pareto.name})"]
    path = directory / REPORT
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def _layer_lines(
    plan: Plan,
    costs: dict[str, dict[str, list[int]]],
    checked: dict[str, dict[str, float]],
    operator: dict[str, dict[str, float | None]],
) -> list[str]:
    """The per-layer table: scheme, storage and predicted damage of every layer; where some layer
    stores fewer numbers than its float weight (a factorized layer), its parameters before and
    after and its multiply-accumulates ratio; where the plan's predictions were checked, each
    changed layer's predicted and measured loss change (that layer alone changed); where operator
    errors were measured, each layer's and its scheme's bound; where the plan mixes compression
    families (joint), each layer's family."""
    shrunk = any(c["parameters"][1] < c["parameters"][0] for c in costs.values())
    mixed = len({layer.scheme.kinds for layer in plan.layers} - {"keep"}) > 1
    header = ["layer", "kind", "weight shape", "scheme", "bits/weight", "cost (bits)", "damage"]
    if mixed:
        header.insert(4, "family")
    if shrunk:
        header += ["parameters", "MACs ratio"]
    if checked:
        header += ["predicted dL", "measured dL"]
    if operator:
        header += ["operator error", "bound"]
    rows = []
    for layer in plan.layers:
        row = [
            layer.name,
            layer.spec.kind,
            "x".join(map(str, layer.spec.weight_shape)),
            layer.scheme.label(),
            round(layer.cost_bits / layer.spec.numel, 3),
            layer.cost_bits,
            "" if layer.damage is None else float(layer.damage),
        ]
        if mixed:
            row.insert(4, layer.scheme.kinds)
        cost = costs.get(layer.name)
        if shrunk:
            if cost is None:
                row += ["", ""]
            else:
                (before, after), (dense, executed) = cost["parameters"], cost["macs"]
                ratio = f"{dense / executed:.2f}x" if executed else ""
                row += [f"{before:,} -> {after:,}", ratio]
        if checked:
            check = checked.get(layer.name)
            row += ["", ""] if check is None else [check["predicted"], check["measured"]]
        if operator:
            row += _operator_cells(operator.get(layer.name))
        rows.append(row)
    return _table(header, rows)


def _screening_lines(screening: dict) -> list[str]:
    """How many candidates screening dropped unscored (the plan's `screened` metadata)."""
    if not screening:
        return []
    layers = screening["layers"].values()
    out = sum(e["screened_out"] for e in layers)
    total = out + sum(e["scored"] for e in layers)
    return [
        "",
        f"Screening: {out} of {total} candidates were dropped unscored, each beaten by more than "
        f"{_fmt(float(screening['margin']))}x in output error |dW x|^2 by a candidate of its layer "
        "that stores no more.",
    ]


def _family_lines(plan: Plan, families: dict[str, dict[str, dict | None]]) -> list[str]:
    """Why each layer got its family: every family's least damaging candidate of the layer that
    costs no more than the chosen one (the plan's `families` metadata, when it has one; layers
    it does not name are left out)."""
    if not families:
        return []
    names = sorted({family for entry in families.values() for family in entry})
    rows = []
    for layer in plan.layers:
        entry = families.get(layer.name)
        if entry is None:
            continue
        cells = []
        for family in names:
            candidate = entry.get(family)
            cells.append(
                "none this small"
                if candidate is None
                else f"{candidate['label']} ({_fmt(float(candidate['damage']))})"
            )
        rows.append([layer.name, f"{layer.scheme.label()} ({layer.scheme.kinds})", *cells])
    return [
        "",
        "## Families per layer",
        "",
        "For each layer, each family's least damaging candidate that costs no more than the "
        "layer's chosen one, with its predicted damage: the allocator weighs these across "
        "layers under the one budget.",
        "",
        *_table(["layer", "chosen (family)", *names], rows),
    ]


def _operator_cells(entry: dict[str, float | None] | None) -> list[Any]:
    if entry is None:
        return ["", ""]
    return [float(entry["measured"]), "" if entry["bound"] is None else float(entry["bound"])]


def _prediction_lines(prediction: dict[str, float] | None) -> list[str]:
    if prediction is None:
        return []
    return [
        "",
        "## Predicted vs measured loss change",
        "",
        "Second-order predictions for the whole plan next to the measured changes (task-loss "
        "units: nats for cross-entropy). *per layer* is what the allocator adds up; *joint* "
        "includes the cross-layer terms d_i'H_ij d_j.",
        "",
        *_table(
            ["g.d", "per layer", "joint", "measured (calibration)", "measured (held-out)"],
            [
                [
                    prediction["linear"],
                    prediction["per_layer"],
                    prediction["joint"],
                    prediction["measured_calibration"],
                    prediction["measured_held_out"],
                ]
            ],
        ),
    ]


def _geometry_lines(split: dict[str, dict[str, Any]] | None) -> list[str]:
    if not split:
        return []
    return [
        "",
        "## Error geometry",
        "",
        "Per changed layer: the share of its error |d|^2, and of its quadratic damage d'H d, that "
        "lies along the top Lanczos eigenvectors of its Hessian block (the minor axes; the rest "
        "lies along the major axes), the loss change along negative-curvature directions, and "
        "whether the block certainly has a negative eigenvalue (saddle).",
        "",
        *_table(
            ["layer", "top eigvecs", "share of |d|^2", "share of d'Hd", "negative part", "saddle"],
            [
                [
                    name,
                    g["eigenvectors"],
                    g["top_error_share"],
                    "" if g["top_curvature_share"] is None else g["top_curvature_share"],
                    g["negative_curvature"],
                    "yes" if g["saddle"] else "",
                ]
                for name, g in split.items()
            ],
        ),
    ]


def write_sensitivity(sensitivity: Sensitivity, title: str, directory: Path) -> Path:
    """Write `analysis.md`, `analysis.json` and the sensitivity plots into `directory`."""
    directory = Path(directory)
    write_json(directory / "analysis.json", {"title": title, **sensitivity.to_json()})
    plots = _plots()
    if plots is not None:
        plots.curvature_plot(sensitivity, directory / "curvature.png")
        plots.sensitivity_plot(sensitivity, directory / "sensitivity.png")
    labels = list(dict.fromkeys(k for row in sensitivity.layers for k in row.candidates))
    lines = [
        f"# allot analysis: {title}",
        "",
        f"Predicted damage by the `{sensitivity.error_model}` error model. Curvature of the "
        "calibration loss per layer: Hutchinson trace (± standard error), Lanczos extreme "
        "eigenvalues (± residual bound); *saddle* marks a layer whose Hessian block certainly has "
        f"a negative eigenvalue. Cost: {sensitivity.fb_equivalents} forward+backward equivalents "
        f"over the calibration set, {sensitivity.seconds:.1f} s, peak resident memory "
        f"{sensitivity.peak_memory_bytes / 2**20:,.0f} MiB.",
        "",
        *_table(
            ["layer", "weights", "|g|", "trace", "± se", "top eig", "± res", "min eig", "saddle"],
            [
                [
                    r.name,
                    r.weights,
                    r.gradient_norm,
                    r.trace,
                    r.trace_stderr,
                    r.top_eigenvalue,
                    r.top_residual,
                    r.bottom_eigenvalue,
                    "yes" if r.saddle else "",
                ]
                for r in sensitivity.layers
            ],
        ),
        "",
        "Predicted damage per candidate:",
        "",
        *_table(
            ["layer", *labels],
            [
                [r.name, *(r.candidates.get(k, (0, ""))[1] for k in labels)]
                for r in sensitivity.layers
            ],
        ),
        "",
        *(
            ["![curvature](curvature.png)", "", "![sensitivity](sensitivity.png)"]
            if plots is not None
            else [NO_PLOTS]
        ),
        "",
    ]
    path = directory / "analysis.md"
    atomic_write(path, "\n".join(lines).encode())
    return path

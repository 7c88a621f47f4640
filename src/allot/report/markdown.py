"""The markdown report written next to an artifact: summary, per-layer plan, plots.

Plots need matplotlib, the optional `plots` extra; without it the report is written without them
and says how to get them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from allot.files import atomic_write, write_json
from allot.plan import Plan
from allot.sensitivity import Sensitivity

REPORT = "report.md"
NO_PLOTS = "Plots need matplotlib: pip install 'allot[plots]'."


def _plots() -> ModuleType | None:
    """`allot.report.plots`, or None when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from allot.report import plots

    return plots


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
    """Write `report.md` and its plots into `directory`; `evaluation` maps a model label ("float",
    "compressed") to its metrics and sizes. Returns the report's path."""
    directory = Path(directory)
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
    operator = plan.metadata.get("operator_error") or {}
    lines += _table(
        [
            "layer",
            "kind",
            "weight shape",
            "scheme",
            "bits/weight",
            "cost (bits)",
            "damage",
            *(["operator error", "bound"] if operator else []),
        ],
        [
            [
                layer.name,
                layer.spec.kind,
                "x".join(map(str, layer.spec.weight_shape)),
                layer.scheme.label(),
                round(layer.cost_bits / layer.spec.numel, 3),
                layer.cost_bits,
                "" if layer.damage is None else float(layer.damage),
                *(_operator_cells(operator.get(layer.name)) if operator else []),
            ]
            for layer in plan.layers
        ],
    )
    if operator:
        lines += [
            "",
            "*operator error*: the relative operator-norm error |W_hat - W|_2 / |W|_2 of each "
            "layer as fitted (before any refinement); *bound*: the bound its scheme states for it "
            "(ALDS: sqrt(k) max_i sigma_{j+1}(W_i) / sigma_1(W) for k groups at rank j).",
        ]
    lines += _prediction_lines(plan.metadata.get("prediction"))
    lines += _geometry_lines(plan.metadata.get("geometry"))
    if plan.folded:
        lines += ["", "BatchNorm folded into: " + ", ".join(f"{c} <- {b}" for c, b in plan.folded)]
    if plan.skipped:
        lines += ["", "## Kept in float", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in plan.skipped.items()]
    for note in plan.metadata.get("notes", []):
        lines += ["", f"Note: {note}"]
    lines += ["", "## Plots", ""]
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
        f"over the calibration set, {sensitivity.seconds:.1f} s.",
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

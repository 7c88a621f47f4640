"""Report plots (matplotlib, headless): per-layer allocation, predicted damage, sensitivity."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from allot.files import atomic_write
from allot.plan import Plan
from allot.sensitivity import Sensitivity

MAX_BARS = 200
"""Most layers drawn as labelled bars; more are drawn as one filled step line by layer index, so
a plot's size and drawing time stay bounded whatever the number of layers."""


def _bar(
    path: Path, labels: list[str], values: list[float], ylabel: str, title: str, log: bool = False
) -> None:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * min(len(labels), MAX_BARS) + 2), 4))
    if len(values) <= MAX_BARS:
        ax.bar(range(len(values)), values, color="#3b6ea8")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    else:
        ax.stairs(values, fill=True, color="#3b6ea8")
        ax.set_xlabel(f"layer index ({len(values):,} layers)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("symlog", linthresh=1e-12)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def allocation_plot(plan: Plan, path: Path) -> Path:
    """Bar chart of stored bits per weight for every layer (32 = float)."""
    _bar(
        path,
        [layer.name for layer in plan.layers],
        [layer.cost_bits / layer.spec.numel for layer in plan.layers],
        "bits per weight (incl. metadata)",
        f"{plan.method}: per-layer allocation",
    )
    return path


def damage_plot(plan: Plan, path: Path) -> Path | None:
    """Bar chart of each layer's predicted damage (None when the plan has no damages)."""
    if plan.damage is None:
        return None
    _bar(
        path,
        [layer.name for layer in plan.layers],
        [layer.damage for layer in plan.layers],
        f"predicted damage ({plan.error_model} error model)",
        "damage per layer",
        log=True,
    )
    return path


def pareto_plot(plan: Plan, path: Path) -> Path | None:
    """The allocator's Pareto curve (predicted damage against bits per weight) with the chosen plan
    marked (None when the plan carries no curve)."""
    points = plan.metadata.get("pareto")
    if not points or plan.damage is None:
        return None
    bits, damage = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bits, damage, marker=".", color="#3b6ea8", label="Pareto curve (convex)")
    ax.plot(
        [plan.weight_bits / plan.n_weights], [plan.damage], "o", color="#c0392b", label="this plan"
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1e-9)
    ax.set_xlabel("bits per weight (incl. metadata)")
    ax.set_ylabel(f"predicted damage ({plan.error_model})")
    ax.set_title(f"{plan.method}: size against predicted damage")
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def curvature_plot(sensitivity: Sensitivity, path: Path) -> Path:
    """Per-layer gradient norm, Hessian trace per weight and top eigenvalue (log scale)."""
    names = [row.name for row in sensitivity.layers]
    panels = [
        ("gradient norm |g|", [row.gradient_norm for row in sensitivity.layers]),
        ("trace(H) / weights", [row.trace / row.weights for row in sensitivity.layers]),
        ("top eigenvalue of H", [row.top_eigenvalue for row in sensitivity.layers]),
    ]
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.28 * len(names) + 2), 8), sharex=True)
    for ax, (label, values) in zip(axes, panels, strict=True):
        ax.bar(range(len(values)), values, color="#3b6ea8")
        ax.set_yscale("symlog", linthresh=1e-8)
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes[0].set_title("per-layer curvature of the calibration loss")
    _save(fig, path)
    return path


def sensitivity_plot(sensitivity: Sensitivity, path: Path) -> Path:
    """Predicted damage against stored bits per weight, one line per layer."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in sensitivity.layers:
        points = sorted(row.candidates.values())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1, label=row.name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1e-8)
    ax.set_xlabel("bits per weight (incl. metadata)")
    ax.set_ylabel(f"predicted damage ({sensitivity.error_model})")
    ax.set_title("candidates per layer")
    if len(sensitivity.layers) <= 24:
        ax.legend(fontsize=5, ncol=2)
    _save(fig, path)
    return path

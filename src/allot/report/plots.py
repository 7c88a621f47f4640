"""Report plots (matplotlib, headless): per-layer allocation and predicted damage."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from allot.io import atomic_write
from allot.plan import Plan


def _bar(
    path: Path, labels: list[str], values: list[float], ylabel: str, title: str, log: bool = False
) -> None:
    width = max(6.0, 0.28 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(width, 4))
    ax.bar(range(len(values)), values, color="#3b6ea8")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("symlog", linthresh=1e-12)
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

"""What every benchmark script shares: the run's environment record, its command line, and
writing figures atomically."""

from __future__ import annotations

import io
import platform
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from allot.io import atomic_write
from allot.zoo import Dataset

RESULTS = Path(__file__).parent / "results"


def environment(model_name: str, dataset: Dataset, seed: int) -> dict:
    """The facts a result depends on besides the code: model, data, seed, torch, threads."""
    return {
        "model": model_name,
        "dataset": dataset.name,
        "headline": dataset.task.headline,
        "calibration_samples": len(dataset.calibration),
        "seed": seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def command() -> str:
    """The command line that ran this script, as written into the results."""
    script = Path(sys.argv[0])
    return "python " + " ".join(shlex.quote(a) for a in [f"bench/{script.name}", *sys.argv[1:]])


def save_figure(figure: plt.Figure, path: Path, dpi: int = 110) -> None:
    """Write a figure as PNG atomically, then close it."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    atomic_write(path, buffer.getvalue())

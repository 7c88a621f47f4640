"""What every benchmark script shares: the run's environment record, its command line, and
writing figures atomically."""

from __future__ import annotations

import io
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from allot.files import atomic_write
from allot.zoo import Dataset

RESULTS = Path(__file__).parent / "results"
REPOSITORY = Path(__file__).parent.parent


def code_version() -> str:
    """The commit the code ran at, `+changes` when the working tree differs from it (results
    themselves aside), or `unknown` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!bench/results"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changes else "")


def environment(model_name: str, dataset: Dataset, seed: int) -> dict:
    """The facts a result depends on: model, data, seed, torch, threads, and the code's commit."""
    return {
        "code": code_version(),
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

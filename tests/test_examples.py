"""examples/: a user's own model and data, compressed through the command line and through Python,
as the README shows them (each well under a minute here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
ALLOT = [sys.executable, "-m", "allot.cli"]


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("example")
    _run([sys.executable, str(EXAMPLES / "model.py"), "weights.safetensors"], folder)
    return folder / "weights.safetensors"


def test_the_command_line_compresses_the_users_model_on_the_users_data(weights: Path) -> None:
    out = weights.parent / "cli"
    stdout = _run(
        [
            *ALLOT,
            "--no-progress",
            "compress",
            *("--model", f"{EXAMPLES / 'model.py'}:make", "--weights", str(weights)),
            *("--data", f"{EXAMPLES / 'data.py'}:calibration"),
            *("--method", "cet-steer", "--ratio", "8", "--keep", "4", "--out", str(out)),
        ],
        weights.parent,
    )
    assert stdout.count("mae: ") == 2
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["compressed"]["ratio"] >= 8
    assert evaluation["compressed"]["mae"] < 1.5 * evaluation["float"]["mae"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["metadata"]["dataset"] == "noisy-sines"
    assert [layer["label"] for layer in plan["layers"]][-1] == "keep"


def test_python_compresses_saves_and_loads_with_the_users_factory(weights: Path) -> None:
    stdout = _run(
        [sys.executable, str(EXAMPLES / "compress.py"), str(weights), "py"], weights.parent
    )
    assert "compressed: {'mae'" in stdout and "4 keep" in stdout
    assert (weights.parent / "py" / "model.safetensors").stat().st_size < weights.stat().st_size / 4

"""What every benchmark script shares: the run's environment record, its command line, writing
figures atomically, and the journal that lets a long run resume."""

from __future__ import annotations

import io
import json
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from allot.api import prepare
from allot.evaluate import metrics
from allot.files import atomic_write, write_json
from allot.profile.measure import mean_loss
from allot.zoo import Dataset, create_model, get_dataset, get_entry

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


def write_results(stem: str, results: dict, text: str) -> None:
    """Write a run's `results` as bench/results/<stem>.json and its report `text` as
    <stem>.md, each atomically."""
    write_json(RESULTS / f"{stem}.json", results)
    atomic_write(RESULTS / f"{stem}.md", text.encode())


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


FOLDED_LR_SCALE = 0.1
"""The training rate of a refinement is the zoo recipe's, a tenth of it where BatchNorm was folded
(bench/refine_rate.py: ResNet-20 folded and fine-tuned at its recipe's 2e-3 falls to 0.827, at
2e-4 keeps 0.983)."""


def refine_settings(model_name: str, folded: bool, epochs: int) -> dict:
    """The zoo recipe's optimiser and learning rate (a tenth of it when BatchNorm was folded),
    cosine-decayed to 0 over `epochs` epochs."""
    zoo = get_entry(model_name).recipe
    assert zoo is not None
    lr = zoo.lr * (FOLDED_LR_SCALE if folded else 1.0)
    return {"epochs": epochs, "lr": lr, "optimizer": zoo.optimizer, "schedule": "cosine"}


class ZooRun:
    """A zoo model as a benchmark starts from: the float model, its data set (`calibration`
    samples drawn with `seed`) and data contract, its prepared (BatchNorm-folded) copy `work`, the
    headline metric's name, and the float model's metrics and calibration loss (`float_metrics`)."""

    def __init__(self, model_name: str, calibration: int, seed: int) -> None:
        self.model_name, self.seed = model_name, seed
        self.model = create_model(model_name)
        self.dataset = get_dataset(
            get_entry(model_name).dataset, calibration_size=calibration, seed=seed
        )
        self.data = self.dataset.to_data()
        self.work, _, _, _ = prepare(self.model)
        self.head = self.dataset.task.headline
        self.float_metrics = {
            **metrics(self.model, self.data),
            "calibration_loss": mean_loss(self.work, self.data),
        }


class Journal:
    """Finished rows of a long benchmark run, written to `path` (atomically) after each row, so a
    run started again with the same `key` (model, calibration size, seed, ...) takes them from
    there instead of running them again. Rows are identified by `row_key` (by default their
    `method` and `budget`); each row made in this run is marked with the code that made it.
    `partial`: report the rows journaled so far and run no more (`--partial` of a benchmark,
    for a run stopped before its end; its results are written as `<stem>-partial`)."""

    def __init__(
        self,
        path: Path,
        key: dict,
        row_key: Callable[[dict], tuple] = lambda row: (row["method"], row["budget"]),
        partial: bool = False,
    ) -> None:
        self.path = path
        self.key = key
        self.row_key = row_key
        self.partial = partial
        self.code = code_version()
        self.rows: list[dict] = []
        self.done: dict[tuple, dict] = {}
        if partial and not path.exists():
            raise SystemExit(f"--partial: there is no journal {path}; nothing to report")
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["key"] != key:
                raise SystemExit(
                    f"{path} holds rows of another run ({saved['key']}, not {key}); "
                    "delete it to start afresh"
                )
            print(f"resuming: {len(saved['rows'])} journaled rows in {path}", flush=True)
            self.done = {row_key(row): row for row in saved["rows"]}

    def add(self, row: dict) -> dict:
        """Append a finished row, marked with the code that made it, and journal it with every
        row journaled before, asked for in this run or not (a run of some of the rows, say
        `--ratios`, must not drop the others)."""
        row["code"] = self.code
        self.rows.append(row)
        self.done[self.row_key(row)] = row
        write_json(self.path, {"key": self.key, "rows": list(self.done.values())})
        return row

    def resume(self, key: tuple) -> dict | None:
        """The row an earlier run finished under `key` (appended to the rows), or None; with
        `partial`, a row not journaled is skipped: callers return this value without running."""
        row = self.done.get(key)
        if row is not None:
            self.rows.append(row)
        return row

    def finish(self) -> None:
        """The run is written out: the journal is no longer needed."""
        self.path.unlink(missing_ok=True)

"""Screening benchmark: does dropping candidates by their output error change joint's plans?

Scores the joint grid once without screening (every candidate's measured loss change, one pass
over the calibration data each), then for each margin keeps the candidates `allocate.screened`
keeps by their output errors |dW x|^2 (what `Method.screen` / `compress --screen` would have
scored) and plans the kept table at joint's ratios. A row says how many candidates the margin
would have measured, and per ratio whether the plan is the unscreened one (the same scheme in
every layer) and its predicted damage against the unscreened plan's. Writes
bench/results/<model>-screen.{json,md}.

    nice python bench/screen.py --model mnist1d-cnn --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
from common import RESULTS, ZooRun, command, environment
from joint import RATIOS

from allot import Budget, compress_scored, score
from allot.allocate import screened
from allot.api import Refinement
from allot.candidates import CandidateTable
from allot.discover import get_weight
from allot.errors import get_error_model
from allot.exceptions import BudgetError
from allot.files import atomic_write, write_json
from allot.methods.joint import JOINT
from allot.modules.base import dense_weight

MARGINS = (1.5, 2.0, 4.0, 8.0)


def output_errors(scored) -> list[np.ndarray]:
    """Per layer, every candidate's output error |dW x|^2 (mean over calibration patches)."""
    table = scored.table
    deltas = {}
    for layer, row in zip(table.layers, table.candidates, strict=True):
        weight, _ = get_weight(scored.work, layer.name)
        deltas[layer.name] = [
            torch.zeros_like(weight) if c.module is None else dense_weight(c.module) - weight
            for c in row
        ]
    errors = get_error_model("output").damages(deltas, scored.profile)
    return [np.maximum(np.array(errors[layer.name]), 0.0) for layer in table.layers]


def plan_of(scored, table: CandidateTable, ratio: float) -> tuple[list[str], float] | None:
    """The schemes and predicted damage of `table`'s plan at `ratio` (None: out of reach)."""
    try:
        plan = compress_scored(
            dataclasses.replace(scored, table=table), Budget("ratio", ratio), Refinement(None)
        ).plan
    except BudgetError:
        return None
    return [layer.scheme.label() for layer in plan.layers], sum(
        layer.damage for layer in plan.layers
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = ZooRun(args.model, args.calibration, args.seed)
    scored = score(
        run.model, run.data, JOINT, model_name=args.model, seed=args.seed, progress=False
    )
    table = scored.table
    errors = output_errors(scored)
    total = sum(len(row) for row in table.candidates)
    full = {ratio: plan_of(scored, table, ratio) for ratio in RATIOS}
    rows = []
    for margin in MARGINS:
        kept = [
            screened(np.array([c.cost_bits for c in row], dtype=np.float64), e, margin)
            for row, e in zip(table.candidates, errors, strict=True)
        ]
        subset = CandidateTable(
            table.layers,
            [[row[j] for j in k] for row, k in zip(table.candidates, kept, strict=True)],
            table.error_model,
        )
        row = {"margin": margin, "scored": sum(k.size for k in kept), "candidates": total}
        for ratio in RATIOS:
            reference, screened_plan = full[ratio], plan_of(scored, subset, ratio)
            row[f"{ratio:g}x"] = (
                None
                if reference is None
                else {
                    "same_plan": screened_plan is not None and screened_plan[0] == reference[0],
                    "damage": None if screened_plan is None else screened_plan[1],
                    "unscreened_damage": reference[1],
                }
            )
        rows.append(row)
        print(row, flush=True)
    results = {
        **environment(args.model, run.dataset, args.seed),
        "command": command(),
        "rows": rows,
    }
    stem = f"{args.model}-screen"
    write_json(RESULTS / f"{stem}.json", results)
    atomic_write(RESULTS / f"{stem}.md", markdown(results).encode())


def markdown(results: dict) -> str:
    header = ["margin", "candidates measured", *(f"{r:g}x" for r in RATIOS)]
    lines = [
        f"# Screening joint's candidates by output error: {results['model']}",
        "",
        f"Command: `{results['command']}`",
        f"Code: {results['code']}; {results['calibration_samples']} calibration samples, "
        f"{results['threads']} thread(s)",
        "",
        "Each margin keeps the candidates no other candidate of their layer storing no more beats "
        "by more than the margin in output error; per ratio: *same* when the kept candidates give "
        "the unscreened plan, else the plan's predicted damage (measured loss change, summed over "
        "layers) against the unscreened plan's.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in results["rows"]:
        cells = [f"{row['margin']:g}", f"{row['scored']} of {row['candidates']}"]
        for ratio in RATIOS:
            entry = row[f"{ratio:g}x"]
            if entry is None:
                cells.append("out of reach")
            elif entry["same_plan"]:
                cells.append("same")
            elif entry["damage"] is None:
                cells.append("out of reach screened")
            else:
                cells.append(f"{entry['damage']:.4g} vs {entry['unscreened_damage']:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

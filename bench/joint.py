"""Joint allocation benchmark: one budget across every compression family against each family
alone, at ratios 8, 11, 16, 24 and 32, post-training and after the same short refinement.

Every variant chooses from the same candidates, scored once: `joint` from the whole joint grid
(`allot.methods.joint`: steered quantization, whitened low-rank with float and with 4-bit
factors, grouped low-rank, sparse, and the sums quant+sparse, rank+sparse, quant+rank, each layer
also free to stay float), and each single family from the same grid restricted to that family
(`quant`, `rank`, `qrank`, `grouped`, `sparse`; the
restricted table is the joint one's rows of that family, which is what scoring the restricted
grid gives: tests/methods/test_joint_method.py). All of them are scored by the measured loss change of
each candidate and chosen by the exact knapsack. Two reference rows: `cet-steer` (CET's own
method: the same steered candidates as `quant`, scored by the curvature damage 1/2 d'Hd) and
`joint-second-order` (the joint grid scored by g.d + 1/2 d'Hd, one exact HVP per candidate: the
ablation behind `joint`'s choice of the measured loss change).

Each (variant, ratio) runs post-training (`none`), with error feedback (`feedback`: every layer
whose scheme re-fits, steered quantization, whitened low rank and sums holding either, re-fitted
in order on the compressed model's inputs) and, with `--finetune-epochs N > 0`, with a short
`finetune` (Adam at 2e-4, cosine, ALDS's short retraining). Rows record the held-out metric, the ratio, the
calibration loss, the families the plan gave its layers, and for `joint` the artifact written and
reloaded. The time to build the joint plan (scoring every candidate, then planning and applying
one budget) is reported as a multiple of one forward+backward pass over the calibration set,
measured in the same run. Finished rows are journaled; `--partial` writes the rows journaled so
far (bench/results/<model>-joint-partial.*) and runs nothing. Writes
bench/results/<model>-joint.{json,md,png}.

    nice python bench/joint.py --model mnist1d-cnn --threads 1 --finetune-epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from common import RESULTS, Journal, ZooRun, command, environment, save_figure, write_results

from allot import Budget, Scored, compress_scored, load, save, score
from allot.api import Refinement
from allot.data import forward
from allot.evaluate import metrics
from allot.exceptions import BudgetError
from allot.io import WEIGHTS
from allot.methods import get_method
from allot.methods.joint import JOINT, joint_grid
from allot.profile.measure import mean_loss

RATIOS = (8.0, 11.0, 16.0, 24.0, 32.0)
SINGLE = ("quant", "rank", "qrank", "grouped", "sparse")
REFERENCES = ("cet-steer", "joint-second-order")
FINETUNE = {"lr": 2e-4}
PASSES = 3
"""Forward+backward passes over the calibration set timed (the median is the unit)."""


class Bench(ZooRun):
    """The model, its data, the scored candidates and the journaled rows of one run."""

    def __init__(
        self, model_name: str, calibration: int, seed: int, finetune: int, partial: bool
    ) -> None:
        key = {"model": model_name, "calibration": calibration, "seed": seed, "finetune": finetune}
        self.journal = Journal(
            RESULTS / f".{model_name}-joint.journal.json",
            key,
            lambda row: (row["method"], row["budget"], row["refine"]),
            partial,
        )
        super().__init__(model_name, calibration, seed)
        self.inputs = self.dataset.example_inputs(8)
        self.float_row = {
            "method": "float",
            "budget": "-",
            "refine": "-",
            "ratio": 1.0,
            **self.float_metrics,
        }
        self.pass_seconds = self.forward_backward()
        self.scored: dict[str, Scored] = {}
        self.scoring_seconds: dict[str, float] = {}

    def forward_backward(self) -> float:
        """Median seconds of one forward and backward pass over every calibration batch."""
        seconds = []
        for _ in range(PASSES):
            start = time.perf_counter()
            for batch in self.data.batches():
                self.work.zero_grad()
                self.data.loss(self.data.outputs(self.work, batch), batch).backward()
            seconds.append(time.perf_counter() - start)
        self.work.zero_grad()
        return statistics.median(seconds)

    def scoring(self, variant: str) -> Scored:
        """The variant's scored candidates: the joint grid and CET scored once each (no disk
        cache, so the seconds are the real cost), the single families restricted from joint."""
        if variant not in self.scored:
            if variant in SINGLE:
                joint = self.scoring("joint")
                method = dataclasses.replace(JOINT, name=variant, grid=joint_grid([variant]))
                self.scored[variant] = dataclasses.replace(
                    joint, method=method, table=joint.table.restricted(method.grid)
                )
            else:
                method = {
                    "joint": JOINT,
                    "cet-steer": get_method("cet-steer"),
                    "joint-second-order": dataclasses.replace(
                        JOINT, name="joint-second-order", error_model="second-order"
                    ),
                }[variant]
                start = time.perf_counter()
                self.scored[variant] = score(
                    self.model,
                    self.data,
                    method,
                    model_name=self.model_name,
                    seed=self.seed,
                    progress=False,
                )
                self.scoring_seconds[variant] = time.perf_counter() - start
                print(f"scored {variant}: {self.scoring_seconds[variant]:.1f} s", flush=True)
        return self.scored[variant]

    def run(self, variant: str, ratio: float, refine: str, finetune: int) -> dict:
        """One row (taken from the journal when an earlier run finished it)."""
        label = f"ratio {ratio:g}x"
        done = self.journal.resume((variant, label, refine))
        if done is not None or self.journal.partial:
            return done
        scored = self.scoring(variant)
        refinement = {
            "none": Refinement(None),
            "feedback": Refinement("feedback"),
            "finetune": Refinement("finetune", {**FINETUNE, "epochs": finetune}),
        }[refine]
        start = time.perf_counter()
        try:
            result = compress_scored(scored, Budget("ratio", ratio), refinement)
        except BudgetError as exc:
            print(f"{variant:20s} {label:12s} {refine:9s} out of reach", flush=True)
            return self.journal.add(
                {"method": variant, "budget": label, "refine": refine, "out_of_reach": str(exc)}
            )
        seconds = time.perf_counter() - start
        plan = result.plan
        row = {
            "method": variant,
            "budget": label,
            "refine": refine,
            "ratio": plan.ratio,
            **metrics(result.model, self.data),
            "calibration_loss": mean_loss(result.model, self.data),
            "predicted_damage": sum(layer.damage for layer in plan.layers),
            "families": dict(Counter(layer.scheme.kinds for layer in plan.layers)),
            "schemes": {layer.name: layer.scheme.label() for layer in plan.layers},
            "seconds": seconds,
        }
        if variant == "joint":
            row.update(self.artifact(result))
        print(
            f"{variant:20s} {label:12s} {refine:9s} {row['ratio']:6.2f}x  {self.head} "
            f"{row[self.head]:.4f}  {' '.join(row['schemes'].values())}",
            flush=True,
        )
        return self.journal.add(row)

    def artifact(self, result) -> dict:
        """The artifact's weight-file bytes and whether it reloads to the same outputs."""
        with tempfile.TemporaryDirectory() as tmp:
            directory = save(result.model, result.plan, Path(tmp) / "artifact")
            size = (directory / WEIGHTS).stat().st_size
            reloaded, _ = load(directory)
            with torch.no_grad():
                same = torch.equal(
                    forward(reloaded, self.inputs), forward(result.model, self.inputs)
                )
        return {"file_bytes": size, "reloads": bool(same)}


def run(
    model_name: str,
    calibration: int,
    seed: int,
    finetune: int,
    partial: bool,
    ratios: tuple[float, ...] = RATIOS,
    references: tuple[str, ...] = REFERENCES,
) -> dict:
    bench = Bench(model_name, calibration, seed, finetune, partial)
    refines = ["none", "feedback"] + (["finetune"] if finetune else [])
    for ratio in ratios:
        for variant in ("joint", *SINGLE, *references):
            for refine in refines:
                if variant == "joint-second-order" and refine != "none":
                    continue
                bench.run(variant, ratio, refine, finetune)
    facts = {
        **environment(model_name, bench.dataset, seed),
        "code": bench.journal.code,
        "finetune_epochs": finetune,
    }
    if partial:  # nothing scored in this process: no build time, no candidate counts
        return {
            **facts,
            "candidates_per_layer": None,
            "build": None,
            "rows": [bench.float_row, *bench.journal.rows],
        }
    # The build time: score the joint grid afresh (no cache) and plan one budget.
    scoring = bench.scoring_seconds.get("joint")
    if scoring is None:  # every row came from the journal: score again to time it
        bench.scoring("joint")
        scoring = bench.scoring_seconds["joint"]
    start = time.perf_counter()
    compress_scored(bench.scored["joint"], Budget("ratio", 16.0), Refinement(None))
    planning = time.perf_counter() - start
    table = bench.scored["joint"].table
    return {
        **facts,
        "candidates_per_layer": {
            layer.name: dict(Counter(c.scheme.kinds for c in row))
            for layer, row in zip(table.layers, table.candidates, strict=True)
        },
        "build": {
            "forward_backward_seconds": bench.pass_seconds,
            "scoring_seconds": scoring,
            "planning_seconds": planning,
            "passes": (scoring + planning) / bench.pass_seconds,
            "second_order_scoring_seconds": bench.scoring_seconds.get("joint-second-order"),
            "cet_scoring_seconds": bench.scoring_seconds.get("cet-steer"),
        },
        "rows": [bench.float_row, *bench.journal.rows],
    }


def _best_single(rows: list[dict], head: str, budget: str, refine: str) -> dict | None:
    reached = [
        r
        for r in rows
        if r["method"] in SINGLE
        and r["budget"] == budget
        and r["refine"] == refine
        and "out_of_reach" not in r
    ]
    return max(reached, key=lambda r: r[head]) if reached else None


def markdown(results: dict) -> str:
    head = results["headline"]
    rows = results["rows"]
    float_row = rows[0]
    build = results["build"]
    refines = list(dict.fromkeys(r["refine"] for r in rows[1:]))
    lines = [
        f"# Joint allocation: {results['model']} on {results['dataset']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Code: {results['code']}  ",
        f"torch {results['torch']}, {results['threads']} threads, "
        f"{results['calibration_samples']} calibration samples, seed {results['seed']}; measured "
        "on a machine shared with other jobs, so seconds are indicative only. `ratio`: float32 "
        "bits of the compressible weights over their stored bits (every stored tensor counted). "
        "Every variant chooses from the same candidates, scored once by their measured loss "
        "change (their layer alone changed) and chosen by the exact knapsack; a single family is "
        "the joint grid restricted to it. `none`: post-training; `feedback`: error feedback "
        "(steered quantization, whitened low rank and sums holding either re-fitted in order; "
        "sparse and grouped layers stay as fitted)"
        + (
            f"; `finetune`: {results['finetune_epochs']} epoch(s) of Adam at {FINETUNE['lr']:g}, "
            "cosine"
            if results["finetune_epochs"]
            else ""
        )
        + f". Float: {head} {float_row[head]:.4f}, calibration loss "
        f"{float_row['calibration_loss']:.5f}.",
        "",
        "## Joint against the best single family",
        "",
        f"| ratio | refine | joint {head} (ratio) | best single family | its {head} (ratio) "
        "| joint - best (pt) | cet-steer |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio in RATIOS:
        budget = f"ratio {ratio:g}x"
        for refine in refines:
            joint = next(
                (
                    r
                    for r in rows
                    if r["method"] == "joint" and r["budget"] == budget and r["refine"] == refine
                ),
                None,
            )
            ran = {r["method"] for r in rows if r["budget"] == budget and r["refine"] == refine}
            if joint is None or not ran & set(SINGLE):  # a partial report: not run yet
                continue
            best = _best_single(rows, head, budget, refine)
            cet = next(
                (
                    r
                    for r in rows
                    if r["method"] == "cet-steer"
                    and r["budget"] == budget
                    and r["refine"] == refine
                ),
                None,
            )
            lines.append(
                f"| {ratio:g} | {refine} | {_cell(joint, head)} "
                f"| {best['method'] if best else 'none reaches it'} | {_cell(best, head)} "
                f"| {_gap(joint, best, head)} | {_cell(cet, head)} |"
            )
    lines += [
        "",
        "## Every row",
        "",
        f"| method | budget | refine | ratio | {head} | delta (pt) | calibration loss "
        "| predicted damage | families | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        if "out_of_reach" in r:
            lines.append(f"| {r['method']} | {r['budget']} | {r['refine']} | out of reach |||||||")
            continue
        families = ", ".join(f"{k} {v}" for k, v in sorted(r["families"].items()))
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['refine']} | {r['ratio']:.2f}x "
            f"| {r[head]:.4f} | {100 * (r[head] - float_row[head]):+.2f} "
            f"| {r['calibration_loss']:.5f} | {r['predicted_damage']:.4g} | {families} "
            f"| {r['seconds']:.1f} |"
        )
    joint_rows = [r for r in rows if r["method"] == "joint" and "file_bytes" in r]
    lines += [
        "",
        "## The joint plans",
        "",
        "| budget | refine | schemes per layer | file bytes | reloads |",
        "|---|---|---|---|---|",
        *(
            f"| {r['budget']} | {r['refine']} | {' '.join(r['schemes'].values())} "
            f"| {r['file_bytes']:,} | {'ok' if r['reloads'] else 'NOT REPRODUCED'} |"
            for r in joint_rows
        ),
        "",
        "## Cost of the joint plan",
        "",
        *_cost(build, results["candidates_per_layer"]),
    ]
    return "\n".join(lines) + "\n"


def _cost(build: dict | None, candidates: dict | None) -> list[str]:
    """The build time and the candidates per layer, or why a partial report has neither."""
    if build is None or candidates is None:
        return [
            "Not in this report: it holds the rows journaled so far by a run that did not "
            "finish (`--partial`), and nothing was scored in the process that wrote it."
        ]
    return [
        f"One forward+backward pass over the calibration set: {build['forward_backward_seconds']:.3f} "
        f"s (median of {PASSES}). Scoring the joint grid: {build['scoring_seconds']:.1f} s, "
        f"planning and applying one budget (16x): {build['planning_seconds']:.2f} s; together "
        f"**{build['passes']:.0f} forward+backward passes**. For comparison, scoring the same grid "
        "by the second-order damage (one exact HVP per candidate): "
        f"{_seconds(build['second_order_scoring_seconds'])}; CET's steered grid by 1/2 d'Hd: "
        f"{_seconds(build['cet_scoring_seconds'])}.",
        "",
        "Candidates per layer (by family):",
        "",
        "| layer | candidates | by family |",
        "|---|---|---|",
        *(
            f"| {name} | {sum(counts.values())} | "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + " |"
            for name, counts in candidates.items()
        ),
    ]


def _cell(row: dict | None, head: str) -> str:
    if row is None or "out_of_reach" in row:
        return "out of reach"
    return f"{row[head]:.4f} ({row['ratio']:.2f}x)"


def _gap(joint: dict, best: dict | None, head: str) -> str:
    if "out_of_reach" in joint:
        return "-"
    if best is None:
        return "only joint reaches it"
    return f"{100 * (joint[head] - best[head]):+.2f}"


def _seconds(value: float | None) -> str:
    return "not run" if value is None else f"{value:.1f} s"


def figure(results: dict, path: Path) -> None:
    """Held-out metric against ratio, one panel per refinement, one line per variant."""
    head = results["headline"]
    rows = [r for r in results["rows"][1:] if "out_of_reach" not in r]
    refines = list(dict.fromkeys(r["refine"] for r in rows))
    fig, axes = plt.subplots(1, len(refines), figsize=(5.5 * len(refines), 4.2), squeeze=False)
    for ax, refine in zip(axes[0], refines, strict=True):
        for variant in ("joint", *SINGLE, *REFERENCES):
            points = sorted(
                (r["ratio"], r[head])
                for r in rows
                if r["method"] == variant and r["refine"] == refine
            )
            if points:
                style = {"linewidth": 2.5, "color": "black"} if variant == "joint" else {}
                ratios, values = zip(*points, strict=True)
                ax.plot(ratios, values, marker="o", label=variant, **style)
        ax.axhline(results["rows"][0][head], color="grey", linestyle=":", label="float")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(RATIOS, [f"{r:g}" for r in RATIOS])
        ax.set_xlabel("compression ratio (float32 bits / stored bits)")
        ax.set_ylabel(head)
        ax.set_title(f"{results['model']}: {refine}")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ratios",
        default=",".join(f"{r:g}" for r in RATIOS),
        help="comma-separated ratios, run in this order (default: all)",
    )
    parser.add_argument(
        "--references",
        default=",".join(REFERENCES),
        help=f"comma-separated reference rows among {', '.join(REFERENCES)} (may be empty)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--finetune-epochs", type=int, default=0, help="also rows with a short finetune (epochs)"
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="write the rows journaled so far as <model>-joint-partial and run no more",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    references = tuple(r for r in args.references.split(",") if r)
    if unknown := sorted(set(references) - set(REFERENCES)):
        parser.error(f"unknown references {unknown}; known: {', '.join(REFERENCES)}")
    results = run(
        args.model,
        args.calibration,
        args.seed,
        args.finetune_epochs,
        args.partial,
        tuple(float(r) for r in args.ratios.split(",")),
        references,
    )
    results["command"] = command()
    stem = f"{args.model}-joint" + ("-partial" if args.partial else "")
    text = markdown(results)
    write_results(stem, results, text)
    figure(results, RESULTS / f"{stem}.png")
    if not args.partial:
        (RESULTS / f".{stem}.journal.json").unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()

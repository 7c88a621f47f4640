"""Low-rank benchmark: lossless and compact joint factorization against the factorization
baselines at equal size, on one model, one calibration set and one byte accounting.

Rows, post-training only:
- `lowrank-compact` under a lossless budget (with `--compact-tolerance L`: a `loss` budget, the
  measured calibration loss within the float model's plus L);
- `lowrank-lossless` at ratios 1.5, 2 and 3 of the factorized layers' parameters and at the ratio
  compact reached, with its ablations at the same sizes: the same knapsack plan refined by error
  feedback only (`/feedback`) and not refined (`/none`), and the knapsack on the second-order
  damage g.d + 1/2 d'Hd (one HVP per candidate, as the issue and CET) and on the curvature damage
  1/2 d'Hd alone instead of the measured loss change, not refined;
- the baselines at the same sizes: `svd-energy`, `svd-llm`, `uniform-rank`.
Every row: the held-out metric, the calibration loss, the ratio, the share of the compressible
weights' parameters removed (and of the factorized layers' own), the FLOPs ratio (float MACs /
compressed MACs, batch of 32), the CPU latency ratio (compressed / float, batch of 32, median of
interleaved rounds in the same run), both again under `allot.runtime.prepare(model, cache=True)`
(each low-rank layer on the faster of its factors and their dense product), and the artifact
written and reloaded: its bytes next to the bytes the plan predicts (the folded float model's file
less the weight bytes the plan saves).
Finished rows are journaled, so an interrupted run resumes where it stopped; `--partial` writes
the rows journaled so far (bench/results/<model>-lowrank-partial.{json,md}) and runs nothing.
Writes bench/results/<model>-lowrank.{json,md}.

    python bench/lowrank.py --model mnist-resnet20
    python bench/lowrank.py --model mnist1d-cnn
    python bench/lowrank.py --model minilm --calibration 128 --compact-tolerance 0.02
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, Journal, ZooRun, command, environment, write_results

from allot import Budget, Refinement, Result, Scored, compress_scored, load, runtime, save, score
from allot.data import forward
from allot.evaluate import file_bytes, latencies, macs, metrics
from allot.exceptions import BudgetError
from allot.io import WEIGHTS
from allot.methods import Method, get_method
from allot.profile.cache import Cache, default_directory
from allot.profile.measure import mean_loss
from allot.schemes import LowRank

RATIOS = (1.5, 2.0, 3.0)
BASELINES = ("svd-energy", "svd-llm", "uniform-rank")
LATENCY_BATCH = 32
LATENCY_REPEATS = 20
LOSSLESS = get_method("lowrank-lossless")
SECOND_ORDER = dataclasses.replace(
    LOSSLESS, name="lowrank-lossless-second-order", error_model="second-order"
)
CURVATURE = dataclasses.replace(
    LOSSLESS, name="lowrank-lossless-curvature", error_model="curvature"
)
# (row name, method, refinement: None for the method's own, else (refiner or None,))
VARIANTS = (
    ("lowrank-lossless", LOSSLESS, None),
    ("lowrank-lossless/feedback", LOSSLESS, ("feedback",)),
    ("lowrank-lossless/none", LOSSLESS, (None,)),
    ("lowrank-lossless-second-order/none", SECOND_ORDER, (None,)),
    ("lowrank-lossless-curvature/none", CURVATURE, (None,)),
)


class Bench(ZooRun):
    """The model, its folded copy, the data, timing inputs and the journaled rows of one run."""

    def __init__(
        self, model_name: str, calibration: int, seed: int, tolerance: float, partial: bool
    ) -> None:
        key = {
            "model": model_name,
            "calibration": calibration,
            "seed": seed,
            "tolerance": tolerance,
        }
        self.journal = Journal(
            RESULTS / f".{model_name}-lowrank.journal.json", key, partial=partial
        )
        super().__init__(model_name, calibration, seed)
        self.inputs = self.dataset.example_inputs(LATENCY_BATCH)
        self.float_macs = macs(self.work, self.inputs)
        self.float_file = file_bytes(self.work)
        self.float_row = {
            "method": "float",
            "budget": "-",
            "ratio": 1.0,
            **self.float_metrics,
            "file_bytes": self.float_file,
        }
        self.cache = Cache(default_directory())
        self.scored: dict[str, tuple[Scored, float]] = {}

    def scoring(self, method: Method) -> tuple[Scored, float]:
        """The method's candidates scored once per run (and the seconds it took)."""
        if method.name not in self.scored:
            start = time.perf_counter()
            scored = score(
                self.model,
                self.data,
                method,
                model_name=self.model_name,
                seed=self.seed,
                cache=self.cache,
                progress=False,
            )
            self.scored[method.name] = (scored, time.perf_counter() - start)
        return self.scored[method.name]

    def run(
        self, name: str, method: Method, budget: Budget, refinement: tuple | None = None
    ) -> dict | None:
        """One row: plan, apply, refine, evaluate and save `method` under `budget` (taken from
        the journal when an earlier run finished it)."""
        label = budget.describe()
        done = self.journal.resume((name, label))
        if done is not None or self.journal.partial:
            return done
        scored, scoring = self.scoring(method)
        start = time.perf_counter()
        try:
            chosen = None if refinement is None else Refinement(refinement[0], {})
            result = compress_scored(scored, budget, chosen)
        except BudgetError as exc:
            print(f"{name:38s} {label:30s} out of reach", flush=True)
            return self.journal.add({"method": name, "budget": label, "out_of_reach": str(exc)})
        seconds = time.perf_counter() - start
        row = self.record(name, label, result, scoring, seconds)
        delta = 100 * (row[self.head] - self.float_row[self.head])
        print(
            f"{name:38s} {label:30s} {row['ratio']:5.2f}x  {self.head} {row[self.head]:.4f} "
            f"({delta:+.2f} pt)  FLOPs {row['flops_ratio']:.2f}x  latency "
            f"{row['latency_ratio']:.2f}x  {seconds:.0f} s",
            flush=True,
        )
        return row

    def record(self, name: str, label: str, result: Result, scoring: float, seconds: float) -> dict:
        plan, model = result.plan, result.model
        fast = copy.deepcopy(model)
        runtime.prepare(fast, cache=True)
        with torch.no_grad():
            forward(fast, self.inputs)  # each low-rank layer times its two forms once
        base, own, chosen = latencies(
            [self.work, model, fast], self.inputs, repeats=LATENCY_REPEATS, warmup=3
        )
        factorized = [layer for layer in plan.layers if isinstance(layer.scheme, LowRank)]
        factorized_float = sum(layer.float_bits for layer in factorized)
        with tempfile.TemporaryDirectory() as tmp:
            directory = save(model, plan, Path(tmp) / "artifact")
            artifact = (directory / WEIGHTS).stat().st_size
            reloaded, _ = load(directory)
            with torch.no_grad():
                reloads = bool(
                    torch.equal(forward(reloaded, self.inputs), forward(model, self.inputs))
                )
        return self.journal.add(
            {
                "method": name,
                "budget": label,
                "ratio": plan.ratio,
                **metrics(model, self.data),
                "calibration_loss": mean_loss(model, self.data),
                "removed": 1 - plan.weight_bits / plan.float_weight_bits,
                "factorized_layers": len(factorized),
                "factorized_removed": (
                    1 - sum(layer.cost_bits for layer in factorized) / factorized_float
                    if factorized
                    else 0.0
                ),
                "flops_ratio": self.float_macs / macs(model, self.inputs),
                "latency_ratio": own / base,
                "runtime_flops_ratio": self.float_macs / macs(fast, self.inputs),
                "runtime_latency_ratio": chosen / base,
                "file_bytes": artifact,
                "expected_file_bytes": self.float_file
                - (plan.float_weight_bits - plan.weight_bits) // 8,
                "reloads": reloads,
                "schemes": {layer.name: layer.scheme.label() for layer in plan.layers},
                "prediction": plan.metadata.get("prediction"),
                "lossless": plan.metadata.get("lossless"),
                "joint": _joint_summary(plan.metadata.get("lowrank_joint")),
                "scoring_seconds": scoring,
                "seconds": seconds,
            }
        )


def _joint_summary(records: dict | None) -> dict | None:
    """How many layers the joint step ran on and kept, and their summed predicted loss change
    before and after it (nats)."""
    if not records:
        return None
    ran = [r for r in records.values() if "kept" in r]
    return {
        "layers": len(records),
        "ran": len(ran),
        "kept": sum(bool(r["kept"]) for r in ran),
        "loss_change": [
            sum(r["loss_change"][0] for r in ran),
            sum(r["loss_change"][-1] for r in ran),
        ],
    }


def run(model_name: str, calibration: int, seed: int, tolerance: float, partial: bool) -> dict:
    bench = Bench(model_name, calibration, seed, tolerance, partial)
    compact_budget = Budget("loss", tolerance) if tolerance else Budget("lossless")
    compact = bench.run("lowrank-compact", get_method("lowrank-compact"), compact_budget)
    ratios = list(RATIOS)
    if compact and "ratio" in compact and compact["ratio"] > 1.01:
        ratios.append(round(compact["ratio"], 2))
    for ratio in ratios:
        for name, method, refinement in VARIANTS:
            bench.run(name, method, Budget("ratio", ratio), refinement)
        for name in BASELINES:
            bench.run(name, get_method(name), Budget("ratio", ratio))
    return {
        **environment(model_name, bench.dataset, seed),
        "code": bench.journal.code,
        "compact_tolerance": tolerance,
        "rows": [bench.float_row, *bench.journal.rows],
    }


def markdown(results: dict) -> str:
    head = results["headline"]
    float_row = results["rows"][0]
    tolerance = results["compact_tolerance"]
    compact_budget = (
        f"a loss budget (calibration loss within the float model's + {tolerance:g})"
        if tolerance
        else "a lossless budget (calibration loss at or below the float model's)"
    )
    lines = [
        f"# Low-rank factorization: {results['model']} on {results['dataset']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Code: {results['code']}  ",
        f"torch {results['torch']}, {results['threads']} threads, "
        f"{results['calibration_samples']} calibration samples, seed {results['seed']}; measured "
        "on a machine shared with other jobs, so seconds are indicative only and latency is a "
        "ratio of interleaved timings in the same run. Post-training, no fine-tuning. "
        f"`lowrank-compact` ran under {compact_budget}. `ratio`: float32 bits of the "
        "compressible weights over their stored bits; `removed`: the share of the compressible "
        "weights' parameters removed (in brackets: of the factorized layers' own); `FLOPs`: float "
        f"MACs over compressed MACs, batch {LATENCY_BATCH}; `latency`: compressed over float "
        f"seconds per batch of {LATENCY_BATCH} (median of {LATENCY_REPEATS} interleaved rounds; "
        "below 1 is faster); `runtime`: FLOPs and latency under "
        "`allot.runtime.prepare(model, cache=True)`, each low-rank layer on the faster of its "
        "factors and their dense product (the FLOPs it executes); `file`: artifact bytes written (and reloaded: `ok` when the reloaded "
        "model gives bit-identical outputs) against the bytes the plan predicts. Float: "
        f"{head} {float_row[head]:.4f}, calibration loss {float_row['calibration_loss']:.5f}, "
        f"file {float_row['file_bytes']:,} bytes (BatchNorm folded).",
        "",
        f"| method | budget | ratio | {head} | delta (pt) | calibration loss | removed "
        "| FLOPs | latency | runtime | file (expected) | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"][1:]:
        if "out_of_reach" in r:
            lines.append(f"| {r['method']} | {r['budget']} | out of reach | | | | | | | | | |")
            continue
        reload = "ok" if r["reloads"] else "NOT REPRODUCED"
        fast = (
            f"{r['runtime_flops_ratio']:.2f}x, {r['runtime_latency_ratio']:.2f}x"
            if "runtime_latency_ratio" in r
            else "-"
        )
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['ratio']:.2f}x | {r[head]:.4f} "
            f"| {100 * (r[head] - float_row[head]):+.2f} | {r['calibration_loss']:.5f} "
            f"| {100 * r['removed']:.1f}% ({100 * r['factorized_removed']:.1f}%) "
            f"| {r['flops_ratio']:.2f}x | {r['latency_ratio']:.2f}x | {fast} "
            f"| {r['file_bytes']:,} ({r['expected_file_bytes']:,}) {reload} "
            f"| {r['scoring_seconds']:.0f} + {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "Seconds: scoring the method's candidates (once per method and run) + planning, applying, "
        "refining and evaluating the row. `/feedback` and `/none` are `lowrank-lossless`'s "
        "knapsack plan refined by error feedback only and not refined; `-second-order/none` and "
        "`-curvature/none` are the knapsack on g.d + 1/2 d'Hd and on 1/2 d'Hd (one exact HVP per "
        "candidate) instead of the measured loss change, not refined.",
        "",
    ]
    joint = [(r["method"], r["budget"], r["joint"]) for r in results["rows"] if r.get("joint")]
    if joint:
        lines += [
            "## The joint step",
            "",
            "Per row: factorized layers, layers the step ran on (a positive curvature along the "
            "error), layers where it was kept (the measured calibration loss fell), and the "
            "summed predicted loss change of those layers before and after it (nats).",
            "",
            "| method | budget | layers | ran | kept | predicted change before | after |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {b} | {j['layers']} | {j['ran']} | {j['kept']} "
            f"| {j['loss_change'][0]:.4g} | {j['loss_change'][1]:.4g} |"
            for m, b, j in joint
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compact-tolerance",
        type=float,
        default=0.0,
        help="run compact under a loss budget with this tolerance (default: lossless)",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="write the rows journaled so far as <model>-lowrank-partial and run no more",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args.model, args.calibration, args.seed, args.compact_tolerance, args.partial)
    results["command"] = command()
    stem = f"{args.model}-lowrank"
    suffix = "-partial" if args.partial else ""
    text = markdown(results)
    write_results(stem + suffix, results, text)
    if not args.partial:
        (RESULTS / f".{stem}.journal.json").unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()

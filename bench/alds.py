"""ALDS benchmark: grouped low-rank decomposition against plain-SVD baselines at equal size,
one-shot and after a short refine.

Every method runs on the same model, calibration data and byte accounting (float32 factors; a
layer left in float counts 32 bits a weight). Sizes are fractions of the compressible weights'
parameters removed: 50, 60, 70, 75 and 80% (ratios 2 to 5), each one-shot and after the shared
`finetune` refinement; and 10 to 40% one-shot only, where the paper's one-shot anchor lies (17%
removed at 0.4 pt drop). The refinement is the paper's retraining with the original training
hyperparameters, shortened to 2 epochs: the zoo recipe's optimiser, batch size and learning rate,
decayed by a cosine to 0 ("rewound": it restarts at the training rate instead of continuing at the
final, near-zero one), one tenth of that rate for a model whose BatchNorm was folded (the folded
float ResNet-20 diverges when fine-tuned at its recipe's 2e-3: training loss 13.9 after one
epoch). `alds` and `svd-energy` also get a 10-epoch refinement at 75% removed, to show what longer
retraining (the paper's regime) recovers.

- `alds`: grouped SVD, every (k groups | input channels, rank j), relative operator-norm error,
  the paper's search (global threshold + local k, 15 seeds x 4 iterations);
- `alds-minmax`: the same candidates and error, the exact min-max over all (k, j);
- `alds-knapsack`: the same candidates, exact knapsack on 1/2 d'H_ii d (one HVP a candidate);
  `alds-knapsack-gradient`: the same on g.d + 1/2 d'H_ii d, run to choose between the two;
  `alds-knapsack-whitened`: `alds-knapsack` with every candidate fitted to the calibration inputs;
- `svd-energy`: SVD-Energy, plain SVD at every rank, one threshold on the relative Frobenius error
  (`weight-relative` + `minmax`); `alds-k1`: ALDS without groups (k = 1, same error and min-max);
  `uniform-rank`: the same rank fraction in every layer.
Rows record held-out accuracy, the achieved ratio, the MACs ratio and the CPU latency ratio to the
float model (one forward pass on 32 test inputs, median of interleaved rounds in the same run).
Finished rows are journaled, so an interrupted run resumes. Writes bench/results/<model>-alds.*
`--sizes` runs some of the sizes only; `--add` keeps the rows of the committed results (of the
same model, calibration, seed and refine) and adds this run's, listing every command that made
them.

    nice python bench/alds.py --model mnist-resnet20
    nice python bench/alds.py --model mnist1d-cnn
    nice python bench/alds.py --model mnist-resnet20 --methods alds-knapsack-whitened --add
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from common import RESULTS, code_version, command, environment, refine_settings, save_figure
from torch import nn

from allot import Budget, Scored, compress_scored, score
from allot.api import Refinement, prepare
from allot.discover import Layer
from allot.evaluate import latencies, macs, metrics
from allot.exceptions import BudgetError
from allot.files import atomic_write, write_json
from allot.methods import Method, get_method
from allot.methods.alds import grouped_grid
from allot.profile.cache import Cache
from allot.schemes import Grouped, Keep, LowRank, Scheme
from allot.zoo import Dataset, create_model, get_dataset, get_entry
from allot.zoo.data import SplitBatches

REFINED = (0.5, 0.6, 0.7, 0.75, 0.8)
ONE_SHOT_ONLY = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
LATENCY_BATCH = 32
LATENCY_REPEATS = 15
PAPER_ONE_SHOT = 0.17  # ALDS's own one-shot ResNet-20 (CIFAR-10): 17% removed at 0.4 pt drop
REFINE_EPOCHS = 2
LONG_REFINE = {"methods": ("alds", "svd-energy"), "removed": 0.75, "epochs": 10}


def _below_float(schemes: list[Scheme], layer: Layer) -> list[Scheme]:
    dense = Keep().storage_bits(layer.spec)
    return [s for s in schemes if s.storage_bits(layer.spec) < dense] + [Keep()]


def svd_grid(layer: Layer) -> list[Scheme]:
    """Plain SVD at every rank that stores less than float, then Keep."""
    full = min(layer.spec.out_features, layer.spec.fan_in)
    return _below_float([LowRank(r) for r in range(1, full + 1)], layer)


def ungrouped_grid(layer: Layer) -> list[Scheme]:
    """ALDS's candidates with k = 1 only."""
    full = Grouped(1, 1).full_rank(layer.spec)
    return _below_float([Grouped(1, r) for r in range(1, full + 1)], layer)


BENCH_METHODS = {
    m.name: m
    for m in (
        Method(
            "svd-energy",
            "SVD-Energy: one threshold on the relative Frobenius error of plain SVD",
            svd_grid,
            error_model="weight-relative",
            allocator="minmax",
        ),
        Method(
            "alds-k1",
            "ALDS without groups: plain SVD, min-max relative operator-norm error",
            ungrouped_grid,
            error_model="operator-relative",
            allocator="minmax",
        ),
        Method(
            "alds-knapsack-gradient",
            "grouped SVD, exact knapsack on g.d + 1/2 d'Hd",
            grouped_grid,
            error_model="second-order",
            allocator="knapsack",
        ),
    )
}
METHODS = (
    "alds",
    "alds-minmax",
    "alds-knapsack",
    "alds-knapsack-gradient",
    "alds-knapsack-whitened",
    "svd-energy",
    "alds-k1",
    "uniform-rank",
)
BASELINES = ("svd-energy", "alds-k1", "uniform-rank")


def method_named(name: str) -> Method:
    return BENCH_METHODS[name] if name in BENCH_METHODS else get_method(name)


class Bench:
    """One run's shared state; finished rows are journaled (as in bench/quant_pareto.py)."""

    def __init__(
        self, model_name: str, calibration: int, seed: int, journal: Path, kept: list[dict]
    ) -> None:
        self.model = create_model(model_name)
        self.work, folded, discovery, _ = prepare(self.model)
        self.batch_size = get_entry(model_name).recipe.batch_size
        self.refine = refine_settings(model_name, bool(folded), REFINE_EPOCHS)
        self.key = {
            "model": model_name,
            "calibration": calibration,
            "seed": seed,
            "refine": self.refine,
            "batch_size": self.batch_size,
        }
        self.code = code_version()
        self.journal = journal
        self.done = self._finished_rows()
        self.dataset: Dataset = get_dataset(
            get_entry(model_name).dataset, calibration_size=calibration, seed=seed
        )
        # Training batches of the recipe's size, reshuffled every pass, as the model was trained.
        self.data = dataclasses.replace(
            self.dataset.to_data(),
            train=SplitBatches(self.dataset.train, self.batch_size, shuffle=seed),
        )
        self.weights = sum(layer.spec.numel for layer in discovery.layers)
        self.head = self.dataset.task.headline
        self.timing_inputs = self.dataset.example_inputs(LATENCY_BATCH)
        self.float_macs = macs(self.work, self.dataset.example_inputs(1))
        self.float_row = {"method": "float", "removed": 0.0, "refine": "-", "ratio": 1.0}
        self.float_row.update(metrics(self.model, self.data))
        self.rows: list[dict] = [self.float_row, *kept]
        self.kept = {_row_key(row) for row in kept}

    def _finished_rows(self) -> dict[tuple, dict]:
        if not self.journal.exists():
            return {}
        saved = json.loads(self.journal.read_text())
        if saved["key"] != self.key:
            raise SystemExit(
                f"{self.journal} holds rows of another run ({saved['key']}, not {self.key}); "
                "delete it to start afresh"
            )
        print(f"resuming: {len(saved['rows']) - 1} finished rows in {self.journal}", flush=True)
        return {_row_key(row): row for row in saved["rows"][1:]}

    def add(self, row: dict) -> None:
        row["code"] = self.code
        self.rows.append(row)
        write_json(self.journal, {"key": self.key, "rows": self.rows})

    def resume(self, method: str, removed: float, refine: str) -> bool:
        if (method, removed, refine) in self.kept:
            return True
        row = self.done.get((method, removed, refine))
        if row is not None:
            self.rows.append(row)
        return row is not None

    def run(self, scored: Scored, removed: float, epochs: int, scoring: float) -> None:
        """Plan, apply, refine for `epochs` epochs (0: one-shot) and record one size of one
        method."""
        method = scored.method
        label = _refine_label(epochs)
        budget = Budget("ratio", 1 / (1 - removed))
        refinement = (
            Refinement("finetune", {**self.refine, "epochs": epochs})
            if epochs
            else Refinement(None)
        )
        start = time.perf_counter()
        try:
            result = compress_scored(scored, budget, refinement)
        except BudgetError as exc:
            self.add({"method": method.name, "removed": removed, "refine": label, "out": str(exc)})
            print(f"{method.name:24s} {removed:.2f} {label:12s} out of reach", flush=True)
            return
        seconds = time.perf_counter() - start
        self.record(method.name, removed, label, result.model, result.plan, scoring, seconds)

    def record(self, name, removed, label, model: nn.Module, plan, scoring, seconds) -> None:
        base, compressed = latencies(
            [self.work, model], self.timing_inputs, repeats=LATENCY_REPEATS, warmup=3
        )
        errors = plan.metadata.get("operator_error") or {}
        row = {
            "method": name,
            "removed": removed,
            "refine": label,
            "ratio": plan.ratio,
            "removed_actual": 1 - 1 / plan.ratio,
            **metrics(model, self.data),
            "macs_ratio": macs(model, self.dataset.example_inputs(1)) / self.float_macs,
            "latency_ratio": compressed / base,
            "max_operator_error": max((e["measured"] for e in errors.values()), default=None),
            "max_bound": max(
                (e["bound"] for e in errors.values() if e["bound"] is not None), default=None
            ),
            "predicted_damage": sum(layer.damage for layer in plan.layers),
            "schemes": {layer.name: layer.scheme.label() for layer in plan.layers},
            "scoring_seconds": scoring,
            "seconds": seconds,
        }
        self.add(row)
        delta = 100 * (row[self.head] - self.float_row[self.head])
        print(
            f"{name:24s} {removed:.2f} {label:12s} {plan.ratio:5.2f}x {self.head} "
            f"{row[self.head]:.4f} ({delta:+.2f} pt) MACs {row['macs_ratio']:.2f} "
            f"latency {row['latency_ratio']:.2f}",
            flush=True,
        )


def _refine_label(epochs: int) -> str:
    return f"finetune {epochs} ep" if epochs else "one-shot"


def _row_key(row: dict) -> tuple:
    return (row["method"], row["removed"], row["refine"])


def run(
    model_name: str,
    methods: list[str],
    sizes: list[float],
    calibration: int,
    seed: int,
    journal: Path,
    earlier: dict | None,
) -> dict:
    bench = Bench(model_name, calibration, seed, journal, earlier["rows"][1:] if earlier else [])
    if earlier and (earlier["refine"], earlier["batch_size"]) != (bench.refine, bench.batch_size):
        raise SystemExit(
            f"--add: the committed results were refined with {earlier['refine']} in batches of "
            f"{earlier['batch_size']}, this run would use {bench.refine} in {bench.batch_size}"
        )
    every = [(p, 0) for p in ONE_SHOT_ONLY] + [(p, e) for p in REFINED for e in (0, REFINE_EPOCHS)]
    plans = [(p, e) for size in sizes for p, e in every if p == size]  # in the order of `sizes`
    longer = [(LONG_REFINE["removed"], LONG_REFINE["epochs"])]
    scored_by_candidates: dict[tuple, Scored] = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = Cache(Path(cache_dir))
        for name in methods:
            method = method_named(name)
            todo = [
                (p, e)
                for p, e in plans + (longer if name in LONG_REFINE["methods"] else [])
                if not bench.resume(name, p, _refine_label(e))
            ]
            if not todo:
                continue
            # Methods with the same candidates and error model share one scoring.
            shared = (method.grid, method.error_model)
            start = time.perf_counter()
            if shared in scored_by_candidates:
                scored = dataclasses.replace(scored_by_candidates[shared], method=method)
            else:
                scored = score(
                    bench.model,
                    bench.data,
                    method,
                    model_name=model_name,
                    seed=seed,
                    cache=cache,
                    progress=False,
                )
                scored_by_candidates[shared] = scored
            scoring = time.perf_counter() - start
            for removed, epochs in todo:
                bench.run(scored, removed, epochs, scoring)
    return {
        **environment(model_name, bench.dataset, seed),
        "code": bench.code,
        "weights": bench.weights,
        "refine": bench.refine,
        "batch_size": bench.batch_size,
        "rows": bench.rows,
    }


def _measured(results: dict) -> list[dict]:
    """The rows with a measurement, each method's by size (refined after one-shot, the long
    refine last), whatever order the runs made them in."""
    rows = [r for r in results["rows"][1:] if "out" not in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    refines = [_refine_label(0), _refine_label(REFINE_EPOCHS)]
    return sorted(
        rows,
        key=lambda r: (
            methods.index(r["method"]),
            r["refine"] not in refines,
            r["removed"],
            r["refine"] != refines[0],
        ),
    )


def _largest_within(rows: list[dict], head: str, reference: float, drop: float) -> float | None:
    """The most parameters removed (achieved) by a row within `drop` (fraction) of the float."""
    within = [r["removed_actual"] for r in rows if r[head] >= reference - drop - 1e-9]
    return max(within, default=None)


def markdown(results: dict, plot: str) -> str:
    head = results["headline"]
    float_value = results["rows"][0][head]
    rows = _measured(results)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = results["refine"]
    lines = [
        f"# ALDS: {results['model']} on {results['dataset']}",
        "",
        *(
            f"Command: `{c['command']}` (code {c['code']})  "
            for c in results.get("commands", [results])
        ),
        f"torch {results['torch']}, {results['threads']} thread(s), "
        f"{results['calibration_samples']} calibration samples, seed {results['seed']}; timings "
        "on a shared machine (other jobs running), so only ratios measured in one run mean "
        "anything. `removed` is the share of the compressible weights' parameters removed "
        f"({results['weights']:,} weights; every stored factor counted, a layer kept in float at "
        "its full size); `ratio` their float size over their stored size. MACs: one forward pass "
        f"as the model executes it, over the float model's. Latency: one forward pass on "
        f"{LATENCY_BATCH} test inputs over the float (BatchNorm-folded) model's, median of "
        f"{LATENCY_REPEATS} interleaved rounds. Refined rows: the `finetune` refinement "
        f"(N epochs on the training split in batches of {results['batch_size']}, "
        f"{settings['optimizer']}, learning rate {settings['lr']:g} decayed by a cosine to 0: the "
        "zoo recipe's optimiser, batch size and rate, a tenth of the rate where BatchNorm was "
        f"folded). Float {head}: {float_value:.4f}.",
        "",
        f"| method | removed | refine | ratio | {head} | delta (pt) | MACs | latency "
        "| max op. error | max bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        op = "" if r.get("max_operator_error") is None else f"{r['max_operator_error']:.3f}"
        bound = "" if r.get("max_bound") is None else f"{r['max_bound']:.3f}"
        lines.append(
            f"| {r['method']} | {100 * r['removed_actual']:.1f}% | {r['refine']} "
            f"| {r['ratio']:.2f}x | {r[head]:.4f} | {100 * (r[head] - float_value):+.2f} "
            f"| {r['macs_ratio']:.2f} | {r['latency_ratio']:.2f} | {op} | {bound} |"
        )
    for r in results["rows"][1:]:
        if "out" in r:
            lines.append(
                f"| {r['method']} | {100 * r['removed']:.0f}% | {r['refine']} | out of "
                "reach | | | | | | |"
            )
    lines += ["", "## Largest share removed within an accuracy drop", ""]
    lines += [
        f"| method | one-shot, <= 0.4 pt | refined {REFINE_EPOCHS} epochs, <= 0.5 pt |",
        "|---|---|---|",
    ]
    for name in methods:
        one_shot = [r for r in rows if r["method"] == name and r["refine"] == "one-shot"]
        refined = [
            r for r in rows if r["method"] == name and r["refine"] == _refine_label(REFINE_EPOCHS)
        ]
        cells = [
            _largest_within(one_shot, head, float_value, 0.004),
            _largest_within(refined, head, float_value, 0.005),
        ]
        lines.append(
            f"| {name} | "
            + " | ".join("none" if c is None else f"{100 * c:.1f}%" for c in cells)
            + " |"
        )
    lines += [
        "",
        f"ALDS's own one-shot ResNet-20 (CIFAR-10) curve keeps the drop within 0.4 pt up to "
        f"{100 * PAPER_ONE_SHOT:.0f}% removed; after retraining it reaches 74.9% within 0.5 pt.",
        "",
        "## ALDS against the baselines at each size",
        "",
        "| removed | refine | alds | best baseline | alds ahead |",
        "|---|---|---|---|---|",
    ]
    for removed in sorted({r["removed"] for r in rows}):
        for label in dict.fromkeys(r["refine"] for r in rows):
            at = {r["method"]: r for r in rows if r["removed"] == removed and r["refine"] == label}
            if "alds" not in at or not any(b in at for b in BASELINES):
                continue
            best = max((at[b] for b in BASELINES if b in at), key=lambda r: r[head])
            ahead = at["alds"][head] > best[head]
            lines.append(
                f"| {100 * removed:.0f}% | {label} | {at['alds'][head]:.4f} "
                f"| {best[head]:.4f} ({best['method']}) | {'yes' if ahead else 'no'} |"
            )
    lines += ["", f"![accuracy]({plot})", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    head = results["headline"]
    float_value = results["rows"][0][head]
    rows = _measured(results)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    for axis, refined in zip(axes, (False, True), strict=True):
        axis.axhline(float_value, color="black", linewidth=0.8, linestyle=":", label="float")
        label = _refine_label(REFINE_EPOCHS if refined else 0)
        chosen = [r for r in rows if r["refine"] == label]
        for i, name in enumerate(dict.fromkeys(r["method"] for r in chosen)):
            points = sorted(
                (100 * r["removed_actual"], r[head]) for r in chosen if r["method"] == name
            )
            axis.plot(
                *zip(*points, strict=True),
                marker="o",
                markersize=3,
                color=plt.get_cmap("tab10")(i % 10),
                label=name,
            )
        axis.set_xlabel("parameters removed (% of the compressible weights)")
        axis.set_ylabel(head)
        axis.set_title(label)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    figure.suptitle(f"{results['model']}: grouped low-rank (ALDS) and SVD baselines")
    save_figure(figure, path)


def _committed(path: Path, args: argparse.Namespace) -> dict:
    """The committed results to add to; exits naming the difference when they are of another
    model, calibration or seed."""
    if not path.exists():
        raise SystemExit(f"--add: {path} does not exist; run without --add first")
    earlier = json.loads(path.read_text())
    ours = (args.model, args.calibration, args.seed)
    theirs = (earlier["model"], earlier["calibration_samples"], earlier["seed"])
    if ours != theirs:
        raise SystemExit(f"--add: {path} holds model, calibration, seed {theirs}, not {ours}")
    return earlier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sizes",
        default=",".join(str(p) for p in ONE_SHOT_ONLY + REFINED),
        help="shares removed to run, comma-separated, among the default ones, in this order",
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the rows of the committed results and add this run's",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stem = f"{args.model}-alds"
    journal = RESULTS / f".{stem}.journal.json"
    methods = [m for m in args.methods.split(",") if m]
    sizes = [float(p) for p in args.sizes.split(",") if p]
    unknown = sorted(set(sizes) - set(ONE_SHOT_ONLY + REFINED))
    if unknown:
        parser.error(f"--sizes {unknown} are not among {ONE_SHOT_ONLY + REFINED}")
    earlier = _committed(RESULTS / f"{stem}.json", args) if args.add else None
    results = run(args.model, methods, sizes, args.calibration, args.seed, journal, earlier)
    results["command"] = command()
    results["commands"] = [
        *(earlier.get("commands", [earlier]) if earlier else []),
        {"command": results["command"], "code": results["code"]},
    ]
    write_json(RESULTS / f"{stem}.json", results)
    plot(results, RESULTS / f"{stem}.png")
    text = markdown(results, f"{stem}.png")
    atomic_write(RESULTS / f"{stem}.md", text.encode())
    journal.unlink()
    print(text)


if __name__ == "__main__":
    main()

"""Where the time and memory of one compression go: profile, scoring, one plan, evaluation.

Runs `allot.api.score` then `allot.api.compress_scored` (one budget) and the held-out
evaluation of the compressed model through the public API, with every stage boundary the library
has watched (`stages.Stopwatch`): input statistics, the gradient sweep, fitting (steering, for
steered methods) all candidates, the exact HVPs of the second-order damages, Lanczos and
Hutchinson where the method needs them, measured loss changes, the rest of the error model's
damages, the allocator, apply, the plan's
layer costs, operator errors and prediction check, and evaluation. Each stage's seconds exclude
the watched stages it called; "other" is what its caller did around them. Peak memory is the
resident set's high-water mark per stage and over the run.

    nice python bench/cost.py --model mnist-resnet20 --method cet-steer --calibration 512 \
        --threads 1

Writes bench/results/<model>-cost.{json,md} (`--tag` adds a suffix to the name).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import RESULTS, command, environment
from stages import MIB, Stage, Stopwatch, load

import allot.api as api
import allot.candidates as candidates
import allot.profile.engine as engine
from allot.budget import Budget
from allot.evaluate import metrics
from allot.files import atomic_write, write_json
from allot.profile.hvp import Curvature
from allot.zoo import create_model, get_dataset, get_entry

STAGES = (
    (api, "prepare", "fold BatchNorm, discover layers"),
    (api, "score", "scoring: other"),
    (engine, "input_statistics", "input statistics (1 forward sweep)"),
    (Curvature, "gradient", "gradient sweep"),
    (candidates, "compress_all", "fitting candidates (steering)"),
    (engine.Profile, "_second_order", "exact HVPs, one per candidate"),
    (engine.Profile, "krylov", "Lanczos"),
    (engine.Profile, "hessian_estimates", "Hutchinson"),
    (engine.Profile, "measured", "measured loss changes"),
    (api, "compress_scored", "plan: other"),
    (api, "pareto_sweep", "Pareto sweep (report)"),
    (api, "apply", "apply"),
    (api, "layer_costs", "layer costs (parameters, MACs)"),
    (api, "operator_errors", "operator errors"),
    (api, "plan_deltas", "plan deltas"),
    (api, "check_prediction", "prediction check"),
    (api, "error_geometry", "geometry"),
)
"""(owner, attribute, label) of every watched stage, in pipeline order."""
EVALUATION = "evaluation (held-out metrics)"
ALLOCATOR = "allocator (knapsack)"
DAMAGES = "error model: other"


def run(args: argparse.Namespace) -> dict:
    entry = get_entry(args.model)
    dataset = get_dataset(entry.dataset, calibration_size=args.calibration, seed=args.seed)
    data = dataset.to_data()
    model = create_model(args.model)
    kind, value = args.budget.split("=")
    budget = Budget(kind, float(value))
    stopwatch = Stopwatch()
    for owner, name, label in STAGES:
        stopwatch.watch(owner, name, label)
    stopwatch.watch_lookup(api, "get_allocator", ("within_cost", "within_damage"), ALLOCATOR)
    stopwatch.watch_lookup(api, "get_error_model", ("damages",), DAMAGES)
    labels = [label for *_, label in STAGES]
    labels.insert(labels.index("fitting candidates (steering)") + 1, DAMAGES)
    labels.insert(labels.index("plan: other") + 1, ALLOCATOR)
    for label in [*labels, EVALUATION]:
        stopwatch.stages[label] = Stage()  # pipeline order; a stage never called shows 0 calls
    evaluate = stopwatch.wrap(metrics, EVALUATION)
    start = time.perf_counter()
    try:
        scored = api.score(model, data, args.method, seed=args.seed, progress=False)
        scoring_s = time.perf_counter() - start
        result = api.compress_scored(scored, budget, geometry=not args.no_geometry)
        plan_s = time.perf_counter() - start - scoring_s
        evaluation = evaluate(result.model, data)
    finally:
        stopwatch.restore()
    total = time.perf_counter() - start
    rows = scored.table.candidates
    passes = scored.profile.curvature.passes
    return {
        "command": command(),
        **environment(args.model, dataset, args.seed),
        "method": args.method,
        "budget": budget.describe(),
        "geometry": not args.no_geometry,
        "load_average": load(),
        "layers": len(rows),
        "parameters": sum(p.numel() for p in model.parameters()),
        "candidates": sum(len(row) for row in rows),
        "candidates_fitted": sum(c.scheme.kinds != "keep" for row in rows for c in row),
        "forward_backward_equivalents": passes.fb_equivalents,
        "gradient_sweeps": passes.gradient_sweeps,
        "second_backward_sweeps": passes.second_backward_sweeps,
        "scoring_s": scoring_s,
        "plan_s": plan_s,
        "total_s": total,
        "evaluation": evaluation,
        **stopwatch.to_json(),
    }


def markdown(result: dict) -> str:
    stages = result["stages"]
    fitted = result["candidates_fitted"]
    lines = [
        f"# Cost of one compression: {result['model']}, {result['method']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Code {result['code']}, torch {result['torch']}, {result['threads']} thread(s), "
        f"{result['calibration_samples']} calibration samples, seed {result['seed']}, budget "
        f"{result['budget']}"
        + ("." if result.get("geometry", True) else ", the report's error geometry left out."),
        "",
        "Run with `nice` on a shared 2-core machine while other benchmarks ran (load average "
        + ", ".join(f"{x:.2f}" for x in result["load_average"])
        + " at the end, 1/5/15 min): absolute seconds are inflated, shares less so.",
        "",
        f"{result['parameters']:,} parameters, {result['layers']} compressible layers, "
        f"{result['candidates']} candidates ({fitted} not keeping the layer in float). Work: "
        f"{result['forward_backward_equivalents']} forward+backward equivalents "
        f"({result['gradient_sweeps']} gradient sweeps, {result['second_backward_sweeps']} "
        "second backward sweeps) over the calibration set.",
        "",
        f"Profile + scoring {result['scoring_s']:.1f} s, one plan {result['plan_s']:.1f} s, "
        f"in all with evaluation {result['total_s']:.1f} s; peak resident memory "
        f"{result['peak_rss_bytes'] / MIB:.0f} MiB, of which "
        f"{result['start_rss_bytes'] / MIB:.0f} MiB before the run (Python, torch, the model "
        "and the data set loaded).",
        "",
        "| stage | calls | seconds | share | per candidate | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    per_candidate = {"fitting candidates (steering)", "exact HVPs, one per candidate"}
    for label, s in stages.items():
        each = f"{s['seconds'] / fitted * 1e3:.0f} ms" if label in per_candidate else ""
        lines.append(
            f"| {label} | {s['calls']} | {s['seconds']:.2f} | "
            f"{s['seconds'] / result['total_s']:.1%} | {each} | {s['peak_rss_bytes'] / MIB:.0f} |"
        )
    lines += [
        "",
        "Seconds exclude the watched stages a stage called; *other* rows are what `score` and "
        "`compress_scored` did around the watched stages. *Per candidate* divides by the fitted "
        "candidates other than float (keeping a layer in float costs nothing). Peak RSS: the resident set's "
        "high-water mark while the stage ran"
        + (
            " (reset at every stage boundary)."
            if result["per_stage_peaks"]
            else " (the process's peak so far: this system cannot reset it)."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-resnet20")
    parser.add_argument("--method", default="cet-steer")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--budget", default="avg_bits=4", help="KIND=VALUE, e.g. ratio=8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument(
        "--no-geometry", action="store_true", help="plan without the report's error geometry"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    result = run(args)
    stem = f"{args.model}-cost{'-' + args.tag if args.tag else ''}"
    write_json(RESULTS / f"{stem}.json", result)
    atomic_write(RESULTS / f"{stem}.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()

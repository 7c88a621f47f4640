"""Mixed-precision quantization Pareto benchmark: allot's allocators side by side at equal size.

Every method runs on the same model, the same calibration data and the same byte accounting
(bits per weight include scales and offsets), post-training only: the allocators at compression
ratios 4, 8, 11 and 16 of the compressible weights, the uniform methods at 2, 3, 4 and 8 bits
(round-to-nearest against steered rounding at equal bits). `cet-gradient` is CET allocating on
the full second-order damage g.d + 1/2 d'Hd instead of 1/2 d'Hd, kept to show what the gradient
term does. All methods share one on-disk profile cache, so curvature is computed once. Writes
bench/results/<model>-quant-pareto.{json,md,png}.

    python bench/quant_pareto.py --model mnist-resnet20
    python bench/quant_pareto.py --model mnist1d-cnn
    python bench/quant_pareto.py --model minilm --calibration 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from common import RESULTS, command, environment, save_figure

from allot import Budget, compress_scored, score
from allot.evaluate import calibration_loss, metrics
from allot.exceptions import BudgetError
from allot.io import atomic_write, write_json
from allot.methods import Method, get_method
from allot.methods.cet import cet_grid
from allot.profile.cache import Cache
from allot.zoo import create_model, get_dataset, get_entry

METHODS = (
    "uniform-quant",
    "uniform-steered",
    "weight-error-quant",
    "hawq-v2",
    "hawq-v3",
    "cet-gradient",
    "cet",
    "cet-steer",
)
RATIOS = (4.0, 8.0, 11.0, 16.0)
UNIFORM_BITS = (2, 3, 4, 8)
CET_GRADIENT = Method(
    "cet-gradient",
    "CET on the full second-order damage g.d + 1/2 d'Hd",
    cet_grid,
    error_model="second-order",
)


def run(
    model_name: str, methods: list[str], ratios: list[float], calibration: int, seed: int
) -> dict:
    model = create_model(model_name)
    dataset = get_dataset(get_entry(model_name).dataset, calibration_size=calibration, seed=seed)
    head = dataset.task.headline
    float_row = {
        "method": "float",
        "budget": "-",
        "ratio": 1.0,
        "bits_per_weight": 32.0,
        **metrics(model, dataset),
        "calibration_loss": calibration_loss(model, dataset),
    }
    rows = [float_row]
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = Cache(Path(cache_dir))
        for method in methods:
            recipe = CET_GRADIENT if method == CET_GRADIENT.name else get_method(method)
            budgets = (
                [Budget("bits", b) for b in UNIFORM_BITS]
                if recipe.allocator == "uniform"
                else [Budget("ratio", r) for r in ratios]
            )
            start = time.perf_counter()
            scored = score(
                model,
                dataset,
                recipe,
                model_name=model_name,
                seed=seed,
                cache=cache,
                progress=False,
            )
            scoring = time.perf_counter() - start
            for budget in budgets:
                start = time.perf_counter()
                try:
                    result = compress_scored(scored, budget)
                except BudgetError as exc:
                    rows.append(
                        {"method": method, "budget": budget.describe(), "out_of_reach": str(exc)}
                    )
                    print(f"{method:20s} {budget.describe():14s} out of reach", flush=True)
                    continue
                plan = result.plan
                row = {
                    "method": method,
                    "budget": budget.describe(),
                    "ratio": plan.ratio,
                    "bits_per_weight": 32.0 / plan.ratio,
                    **metrics(result.model, dataset),
                    "calibration_loss": calibration_loss(result.model, dataset),
                    "predicted_damage": sum(layer.damage for layer in plan.layers),
                    "bits": {layer.name: layer.scheme.label() for layer in plan.layers},
                    "prediction": plan.metadata.get("prediction"),
                    "scoring_seconds": scoring,
                    "seconds": time.perf_counter() - start,
                }
                rows.append(row)
                print(
                    f"{method:20s} {budget.describe():14s} achieved {plan.ratio:6.2f}x  "
                    f"{head} {row[head]:.4f} ({100 * (row[head] - float_row[head]):+.2f} pt)  "
                    f"{scoring:.0f} + {row['seconds']:.0f} s",
                    flush=True,
                )
    return {**environment(model_name, dataset, seed), "rows": rows}


def markdown(results: dict, command: str, plot: str) -> str:
    head = results["headline"]
    float_row = results["rows"][0]
    lines = [
        f"# Quantization Pareto: {results['model']} on {results['dataset']}",
        "",
        f"Command: `{command}`  ",
        f"torch {results['torch']}, {results['threads']} threads, "
        f"{results['calibration_samples']} calibration samples, seed {results['seed']}. "
        "Post-training, no fine-tuning; every method sees the same calibration data. `ratio` is "
        "the compressible weights' float32 bits over their stored bits (codes, scales and offsets "
        f"counted); bits/weight = 32 / ratio. Float: {head} {float_row[head]:.4f}, calibration "
        f"loss {float_row['calibration_loss']:.4f}.",
        "",
        f"| method | budget | ratio | bits/weight | {head} | delta (pt) | calibration loss "
        "| predicted damage | seconds (scoring + plan) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"][1:]:
        if "out_of_reach" in r:
            lines.append(f"| {r['method']} | {r['budget']} | out of reach | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['ratio']:.2f}x "
            f"| {r['bits_per_weight']:.2f} | {r[head]:.4f} "
            f"| {100 * (r[head] - float_row[head]):+.2f} | {r['calibration_loss']:.4f} "
            f"| {r['predicted_damage']:.4g} | {r['scoring_seconds']:.0f} + {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "Predicted damage is in each method's own error-model units (comparable only within a "
        "method): nats of calibration loss for `cet`, `cet-steer` (1/2 d'Hd) and `cet-gradient` "
        "(g.d + 1/2 d'Hd), HAWQ's Omega for `hawq-*`, squared weight error for "
        "`weight-error-quant`, squared output error for the uniform methods.",
        "",
        f"![pareto]({plot})",
        "",
    ]
    return "\n".join(lines)


def pareto_plot(results: dict, path: Path) -> None:
    head = results["headline"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    float_value = results["rows"][0][head]
    axis.axhline(float_value, color="black", linewidth=0.8, linestyle=":", label="float")
    methods = dict.fromkeys(r["method"] for r in results["rows"][1:])
    for method in methods:
        points = sorted(
            (r["bits_per_weight"], r[head])
            for r in results["rows"]
            if r["method"] == method and "out_of_reach" not in r
        )
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.set_xlabel("bits per weight (scales and offsets included)")
    axis.set_ylabel(head)
    axis.set_title(f"{results['model']}: post-training mixed precision")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    results = run(args.model, args.methods.split(","), ratios, args.calibration, args.seed)
    results["command"] = command()
    stem = f"{args.model}-quant-pareto"
    write_json(RESULTS / f"{stem}.json", results)
    pareto_plot(results, RESULTS / f"{stem}.png")
    text = markdown(results, results["command"], f"{stem}.png")
    atomic_write(RESULTS / f"{stem}.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()

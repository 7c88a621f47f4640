"""Is the gradient term g.d of the second-order damage signal or calibration noise?

For every CET candidate (layer, bits {1..6, 8}, round-to-nearest) the linear term g.d is computed
on the calibration set together with its standard error across chunks of `--chunk` samples. The
same knapsack then allocates at ratios 4, 8, 11 and 16 on three damages, all from one profile:
g.d + 1/2 d'Hd, g.d shrunk by its standard error (positive-part James-Stein) + 1/2 d'Hd, and
1/2 d'Hd alone (what `cet` uses). Writes bench/results/<model>-gradient-term.{json,md}.

    python bench/gradient_term.py --model mnist-resnet20
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from common import RESULTS, command, environment

from allot import Budget, compress_scored, score
from allot.candidates import CandidateTable
from allot.data import forward
from allot.discover import get_weight
from allot.evaluate import metrics
from allot.files import atomic_write, write_json
from allot.methods import Method
from allot.methods.cet import cet_grid
from allot.modules.base import dense_weight
from allot.zoo import create_model, get_dataset, get_entry

RATIOS = (4.0, 8.0, 11.0, 16.0)
VARIANTS = ("g.d + 1/2 d'Hd", "shrunk g.d + 1/2 d'Hd", "1/2 d'Hd")


def _linear_stderr(scored, dataset, deltas: dict[str, list[torch.Tensor]], chunk: int) -> dict:
    """Standard error of each g.d across calibration chunks (sample-weighted mean of chunks)."""
    work = scored.work
    names = list(deltas)
    params = [work.get_submodule(n).weight for n in names]
    work.eval()
    values: dict[str, list[list[float]]] = {n: [[] for _ in deltas[n]] for n in names}
    for inputs, targets in dataset.calibration.batches(chunk):
        loss = dataset.task.loss(forward(work, inputs), targets)
        for name, grad in zip(names, torch.autograd.grad(loss, params), strict=True):
            for i, delta in enumerate(deltas[name]):
                values[name][i].append(float((grad.double() * delta.double()).sum()))
    return {n: [statistics.stdev(v) / len(v) ** 0.5 for v in values[n]] for n in names}


def _shrunk(linear: float, stderr: float) -> float:
    return 0.0 if linear == 0 else linear * max(0.0, 1 - stderr**2 / linear**2)


def run(model_name: str, calibration: int, seed: int, chunk: int) -> dict:
    model = create_model(model_name)
    dataset = get_dataset(get_entry(model_name).dataset, calibration_size=calibration, seed=seed)
    method = Method("cet-gradient", "g.d + 1/2 d'Hd", cet_grid, error_model="second-order")
    scored = score(model, dataset, method, model_name=model_name, seed=seed, progress=False)
    table = scored.table
    deltas = {}
    with torch.no_grad():
        for layer, row in zip(table.layers, table.candidates, strict=True):
            weight, bias = get_weight(scored.work, layer.name)
            deltas[layer.name] = [
                dense_weight(c.scheme.compress(weight, bias, layer.spec)) - weight for c in row
            ]
    terms = scored.profile.second_order(deltas)  # remembered from scoring: no new pass
    stderr = _linear_stderr(scored, dataset, deltas, chunk)
    ratios = [
        abs(t.linear) / se
        for n in deltas
        for t, se in zip(terms[n], stderr[n], strict=True)
        if t.linear != 0 and se > 0
    ]

    def damage(variant: str, term, se: float) -> float:
        linear = {VARIANTS[0]: term.linear, VARIANTS[1]: _shrunk(term.linear, se)}.get(variant, 0)
        return linear + term.quadratic

    rows = []
    for variant in VARIANTS:
        candidates = [
            [
                dataclasses.replace(c, damage=damage(variant, t, se))
                for c, t, se in zip(row, terms[layer.name], stderr[layer.name], strict=True)
            ]
            for layer, row in zip(table.layers, table.candidates, strict=True)
        ]
        variant_table = CandidateTable(table.layers, candidates, table.error_model)
        variant_scored = dataclasses.replace(scored, table=variant_table)
        row = {"damage": variant}
        for ratio in RATIOS:
            result = compress_scored(variant_scored, Budget("ratio", ratio))
            row[f"{ratio:g}x"] = metrics(result.model, scored.data)[dataset.task.headline]
        rows.append(row)
        print(row, flush=True)
    return {
        **environment(model_name, dataset, seed),
        "chunk": chunk,
        "candidates": len(ratios),
        "median_abs_linear_over_stderr": statistics.median(ratios),
        "share_within_two_stderr": sum(r < 2 for r in ratios) / len(ratios),
        "rows": rows,
    }


def markdown(r: dict) -> str:
    head = r["headline"]
    return "\n".join(
        [
            f"# The gradient term of the second-order damage: {r['model']} on {r['dataset']}",
            "",
            f"Command: `{r['command']}`  ",
            f"torch {r['torch']}, {r['threads']} threads, {r['calibration_samples']} calibration "
            f"samples in chunks of {r['chunk']}, seed {r['seed']}.",
            "",
            f"Over {r['candidates']} candidates the median |g.d| is "
            f"{r['median_abs_linear_over_stderr']:.2f} standard errors; "
            f"{100 * r['share_within_two_stderr']:.0f}% are within two.",
            "",
            f"Test {head} of the knapsack's plans (same profile, candidates and knapsack):",
            "",
            "| damage | " + " | ".join(f"{x:g}x" for x in RATIOS) + " |",
            "|---|" + "---|" * len(RATIOS),
            *(
                f"| {row['damage']} | " + " | ".join(f"{row[f'{x:g}x']:.4f}" for x in RATIOS) + " |"
                for row in r["rows"]
            ),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-resnet20")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.calibration, args.seed, args.chunk)
    result["command"] = command()
    write_json(RESULTS / f"{args.model}-gradient-term.json", result)
    text = markdown(result)
    atomic_write(RESULTS / f"{args.model}-gradient-term.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()

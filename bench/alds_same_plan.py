"""The fit alone: `alds-knapsack`'s committed plans with every grouped layer fitted by the whitened
fit instead of each group's plain SVD, one-shot and after the same 2-epoch refine.

For each size, the plan is the one `bench/alds.py` recorded for `alds-knapsack` (its per-layer
(k, j) in bench/results/<model>-alds.json): the allocation is fixed, so the difference is the
fit's. The plain plan is applied again beside it one-shot, as a check that the plan is rebuilt as
it was (its accuracy must equal the committed row's). Data, calibration and refine settings are
`bench/alds.py`'s. Writes bench/results/<model>-alds-same-plan.{md,json}

    nice python bench/alds_same_plan.py --model mnist-resnet20 --sizes 0.75
"""

from __future__ import annotations

import argparse
import copy
import json
import re

import torch
from alds import REFINE_EPOCHS, Bench
from common import RESULTS, command, environment, write_results

from allot.api import Refinement, prepare, refine_model
from allot.apply import apply
from allot.budget import Budget
from allot.evaluate import metrics
from allot.plan import LayerPlan, Plan
from allot.profile.engine import Profile
from allot.schemes import Grouped, Keep, Scheme

SOURCE = "alds-knapsack"


def scheme_of(label: str, fit: str) -> Scheme:
    """The scheme a committed row's label names (`grouped3r8` or `keep`), with `fit`."""
    if label == "keep":
        return Keep()
    found = re.fullmatch(r"grouped(\d+)r(\d+)", label)
    if found is None:
        raise SystemExit(f"unexpected scheme label {label!r} in the committed {SOURCE} rows")
    return Grouped(int(found[1]), int(found[2]), fit)


def run(model_name: str, sizes: list[float], calibration: int, seed: int) -> dict:
    committed = json.loads((RESULTS / f"{model_name}-alds.json").read_text())
    bench = Bench(model_name, calibration, seed, RESULTS / ".same-plan.journal.json", [])
    work, folded, discovery, _ = prepare(bench.model)
    profile = Profile(work, discovery.layers, bench.data, progress=False)
    rows = []
    for size in sizes:
        source = {
            r["refine"]: r
            for r in committed["rows"][1:]
            if r["method"] == SOURCE and r["removed"] == size and "out" not in r
        }
        labels = source["one-shot"]["schemes"]
        row = {"removed": size, "ratio": source["one-shot"]["ratio"]}
        for fit in ("plain", "whitened"):
            plan = Plan(
                model=model_name,
                method=f"{SOURCE} plan, {fit} fit",
                error_model="curvature",
                budget=Budget("ratio", 1 / (1 - size)),
                layers=[
                    LayerPlan(layer.name, layer.spec, scheme_of(labels[layer.name], fit))
                    for layer in discovery.layers
                ],
                folded=folded,
            )
            compressed = apply(copy.deepcopy(bench.model), plan, profile)
            row[f"{fit} one-shot"] = metrics(compressed, bench.data)[bench.head]
            print(size, fit, "one-shot", row[f"{fit} one-shot"], flush=True)
            if fit == "plain":
                continue
            settings = {**bench.refine, "epochs": REFINE_EPOCHS}
            refinement = Refinement("finetune", settings)
            refine_model(compressed, plan, bench.model, bench.data, refinement, progress=False)
            row[f"{fit} refined"] = metrics(compressed, bench.data)[bench.head]
            print(size, fit, "refined", row[f"{fit} refined"], flush=True)
        row["committed one-shot"] = source["one-shot"][bench.head]
        row["committed refined"] = source[f"finetune {REFINE_EPOCHS} ep"][bench.head]
        rows.append(row)
    return {
        **environment(model_name, bench.dataset, seed),
        "float": bench.float_row[bench.head],
        "refine": bench.refine,
        "rows": rows,
    }


def markdown(results: dict) -> str:
    head = results["headline"]
    lines = [
        f"# The whitened fit on alds-knapsack's plans: {results['model']} on {results['dataset']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Code: {results['code']}  ",
        f"torch {results['torch']}, {results['threads']} thread(s), "
        f"{results['calibration_samples']} calibration samples, seed {results['seed']}. Each size: "
        f"the per-layer (k, j) `{SOURCE}` chose in bench/results/{results['model']}-alds.json, "
        "every grouped layer fitted by each group's plain SVD (`plain`, ALDS's fit: must equal "
        "the committed one-shot row) or by the whitened fit (`whitened`); refined: the "
        f"`finetune` refinement of bench/alds.py ({REFINE_EPOCHS} epochs, {results['refine']}). "
        f"Float {head}: {results['float']:.4f}.",
        "",
        "| removed | ratio | plain one-shot | committed one-shot | whitened one-shot "
        "| committed refined (plain) | whitened refined |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {100 * r['removed']:.0f}% | {r['ratio']:.2f}x | {r['plain one-shot']:.4f} "
            f"| {r['committed one-shot']:.4f} | {r['whitened one-shot']:.4f} "
            f"| {r['committed refined']:.4f} | {r['whitened refined']:.4f} |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-resnet20")
    parser.add_argument("--sizes", default="0.75")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [float(p) for p in args.sizes.split(",") if p]
    results = run(args.model, sizes, args.calibration, args.seed)
    results["command"] = command()
    stem = f"{args.model}-alds-same-plan"
    text = markdown(results)
    write_results(stem, results, text)
    print(text)


if __name__ == "__main__":
    main()

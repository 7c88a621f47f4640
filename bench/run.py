"""Benchmark harness: several methods on one model over a budget grid, in one process.

Writes bench/results/<model>.json and bench/results/<model>.md (accuracy or fidelity, ratio, bytes,
MACs and latency as ratios against the float model measured in the same run). Later methods add
their rows to GRIDS.

    python bench/run.py --model mnist-resnet20
    python bench/run.py --model mnist1d-cnn --methods uniform-quant,uniform-rank
"""

from __future__ import annotations

import argparse
import time

import torch
from common import RESULTS, command, environment

from allot import Budget, compress
from allot.evaluate import file_bytes, latencies, macs, metrics
from allot.files import atomic_write, write_json
from allot.zoo import create_model, get_dataset, get_entry

GRIDS: dict[str, list[Budget]] = {
    "uniform-quant": [Budget("bits", b) for b in range(2, 9)],
    "uniform-rank": [Budget("ratio", r) for r in (1.25, 1.5, 2, 3, 4)],
    "magnitude-prune": [Budget("ratio", r) for r in (1.25, 1.5, 2, 3)],
    "weight-error-quant": [Budget("ratio", r) for r in (4, 8, 11, 16)],
    "output-error-quant": [Budget("ratio", r) for r in (4, 8, 11, 16)],
}


def run(model_name: str, methods: list[str], calibration: int, seed: int) -> dict:
    float_model = create_model(model_name)
    dataset = get_dataset(get_entry(model_name).dataset, calibration_size=calibration, seed=seed)
    data = dataset.to_data()
    batch = dataset.example_inputs(min(64, len(dataset.test)))
    float_row = {
        "method": "float",
        "budget": "-",
        **metrics(float_model, data),
        "ratio": 1.0,
        "file_bytes": file_bytes(float_model),
        "macs": macs(float_model, batch),
        "latency_ratio": 1.0,
    }
    rows = [float_row]
    for method in methods:
        for budget in GRIDS[method]:
            start = time.perf_counter()
            result = compress(
                float_model,
                data,
                method,
                budget,
                model_name=model_name,
                seed=seed,
                progress=False,
            )
            seconds = time.perf_counter() - start
            own, reference = latencies([result.model, float_model], batch)
            rows.append(
                {
                    "method": method,
                    "budget": budget.describe(),
                    **metrics(result.model, data),
                    "ratio": result.plan.ratio,
                    "file_bytes": file_bytes(result.model),
                    "macs": macs(result.model, batch),
                    "compress_s": seconds,
                    "latency_s": own,
                    "latency_ratio": own / reference,
                }
            )
            print(
                f"{method:20s} {budget.describe():14s} ratio {result.plan.ratio:6.2f}x  "
                f"{dataset.task.headline} {rows[-1][dataset.task.headline]:.4f}",
                flush=True,
            )
    for row in rows:
        row["file_ratio"] = float_row["file_bytes"] / row["file_bytes"]
        row["macs_ratio"] = row["macs"] / float_row["macs"]
    return {**environment(model_name, dataset, seed), "rows": rows}


def markdown(results: dict, command: str) -> str:
    head = results["headline"]
    float_value = results["rows"][0][head]
    lines = [
        f"# {results['model']} on {results['dataset']}",
        "",
        f"Command: `{command}`  ",
        f"torch {results['torch']}, {results['threads']} threads, "
        f"{results['calibration_samples']} calibration samples, seed {results['seed']}. "
        "Post-training, no fine-tuning. Ratios are against the float model in the same run; "
        "`ratio` is the compressible weights' float32 size over their stored size (scales "
        "included), `file ratio` the same for the whole safetensors file.",
        "",
        f"| method | budget | {head} | delta (pt) | ratio | file bytes | file ratio | MACs ratio "
        "| latency ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r[head]:.4f} | {100 * (r[head] - float_value):+.2f} "
            f"| {r['ratio']:.2f}x | {r['file_bytes']:,} | {r['file_ratio']:.2f}x "
            f"| {r['macs_ratio']:.2f} | {r['latency_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--methods", default=",".join(GRIDS))
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in GRIDS]
    if unknown:
        parser.error(f"no budget grid for {unknown}; known: {', '.join(GRIDS)}")
    results = run(args.model, methods, args.calibration, args.seed)
    results["command"] = command()
    write_json(RESULTS / f"{args.model}.json", results)
    text = markdown(results, results["command"])
    atomic_write(RESULTS / f"{args.model}.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()

"""CPU latency of compressed models against float, with and without allot.runtime's switches.

Each model is compressed with `uniform-quant` at 4 bits (round-to-nearest on the default grid,
every compressible layer quantized) and timed at batch 1 and 32 in one interleaved run
(`allot.evaluate.latencies`: every variant once per round, median over rounds), beside:
- `float`: the model as trained (BatchNorm layers as they are);
- `float, BatchNorm folded`: the float model allot compresses (what quant_pareto's latency column
  compares with);
- `dequantize`: the compressed model as loaded (every layer rebuilds its weight on every call);
- `cached weights`: `allot.runtime.cache_weights(model)`;
- `kernels + cache`: `allot.runtime.prepare(model, kernels=True, cache=True)` (int4/int8
  weight-only kernels where the layout allows, cached weights elsewhere).
The headline metric of each compressed variant shows what the kernels' bfloat16 activations do.
Writes bench/results/latency.{json,md}.

    python bench/latency.py --models mnist-resnet20,minilm,mnist1d-cnn
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import RESULTS, code_version, command

from allot import Budget, compress, runtime
from allot.api import prepare
from allot.evaluate import latencies, metrics
from allot.files import atomic_write, write_json
from allot.zoo import create_model, get_dataset, get_entry

BATCHES = (1, 32)
REPEATS = 30
WARMUP = 5
CALIBRATION = {"minilm": 128}


def run_model(name: str, seed: int) -> dict:
    model = create_model(name)
    dataset = get_dataset(
        get_entry(name).dataset, calibration_size=CALIBRATION.get(name, 512), seed=seed
    )
    data = dataset.to_data()
    result = compress(model, data, "uniform-quant", Budget("bits", 4), seed=seed, progress=False)
    folded, *_ = prepare(model)
    cached, kernels = copy.deepcopy(result.model), copy.deepcopy(result.model)
    runtime.cache_weights(cached)
    layout = runtime.prepare(kernels, kernels=True, cache=True)
    variants = {
        "float": model,
        "float, BatchNorm folded": folded,
        "dequantize": result.model,
        "cached weights": cached,
        "kernels + cache": kernels,
    }
    head = dataset.task.headline
    row: dict = {
        "model": name,
        "ratio": result.plan.ratio,
        "layers": {label: list(layout.values()).count(label) for label in set(layout.values())},
        "metric": head,
        "metrics": {k: metrics(v, data)[head] for k, v in variants.items()},
        "seconds": {},
    }
    for batch in BATCHES:
        inputs = dataset.example_inputs(batch)
        times = latencies(list(variants.values()), inputs, repeats=REPEATS, warmup=WARMUP)
        row["seconds"][str(batch)] = dict(zip(variants, times, strict=True))
        print(
            f"{name} batch {batch}: "
            + ", ".join(f"{k} {t / times[0]:.2f}x" for k, t in zip(variants, times, strict=True)),
            flush=True,
        )
    return row


def markdown(results: dict) -> str:
    lines = [
        "# CPU latency of 4-bit models against float",
        "",
        f"Command: `{results['command']}`  ",
        f"Code: {results['code']}  ",
        f"torch {results['torch']}, {results['threads']} thread(s), {results['repeats']} "
        "interleaved rounds (median) after warm-up, on a shared machine (other jobs running: "
        "only ratios within a row are meaningful). Each model is compressed by `uniform-quant` "
        "at 4 bits (round-to-nearest, default grid). Latency ratios are against `float` (the "
        "model as trained) measured in the same run; the BatchNorm-folded float model is what "
        "the compressed layers start from (quant_pareto compares with it).",
        "",
        "| model | batch | float (ms) | float, BatchNorm folded | dequantize | cached weights "
        "| kernels + cache |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for batch, seconds in row["seconds"].items():
            base = seconds["float"]
            ratios = " | ".join(
                f"{seconds[k] / base:.2f}x"
                for k in (
                    "float, BatchNorm folded",
                    "dequantize",
                    "cached weights",
                    "kernels + cache",
                )
            )
            lines.append(f"| {row['model']} | {batch} | {1e3 * base:.2f} | {ratios} |")
    lines += [
        "",
        "Headline metric of each variant (the kernels compute with bfloat16 activations), and "
        "what runs each compressed layer under `kernels + cache`:",
        "",
        "| model | metric | float | dequantize | cached weights | kernels + cache | ratio | layers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        m = row["metrics"]
        layers = ", ".join(f"{n} {label}" for label, n in sorted(row["layers"].items()))
        lines.append(
            f"| {row['model']} | {row['metric']} | {m['float']:.4f} | {m['dequantize']:.4f} "
            f"| {m['cached weights']:.4f} | {m['kernels + cache']:.4f} | {row['ratio']:.2f}x "
            f"| {layers} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist-resnet20,minilm,mnist1d-cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="latency", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "code": code_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": REPEATS,
        "rows": [run_model(name, args.seed) for name in args.models.split(",")],
        "command": command(),
    }
    write_json(RESULTS / f"{args.out}.json", results)
    text = markdown(results)
    atomic_write(RESULTS / f"{args.out}.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()

"""What the profile engine's two speed-ups buy, each against its own baseline in the same run.

1. Split convolutions (`allot.profile.convolution`): seconds of one full HVP and of one lock-step
   block HVP of every layer, with the split graph and with PyTorch's plain convolution double
   backward, interleaved, median of `--repeats`.
2. Deflated Hutchinson (`allot.profile.hutchinson`): every layer's trace standard error after the
   same probes, plain and deflated by the Lanczos Krylov space.

    python bench/hvp_cost.py --model mnist-resnet20
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from common import RESULTS, command, environment

import allot.profile.hvp as hvp
from allot.api import prepare, profile
from allot.files import atomic_write, write_json
from allot.profile.engine import Settings
from allot.profile.hutchinson import hutchinson_blocks
from allot.zoo import create_model, get_dataset, get_entry


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run(model_name: str, calibration: int, seed: int, repeats: int, probes: int) -> dict:
    dataset = get_dataset(get_entry(model_name).dataset, calibration_size=calibration, seed=seed)
    work, _, discovery, _ = prepare(create_model(model_name))
    settings = Settings(probes_min=probes, probes_max=probes, lanczos_iterations=4, seed=seed)
    profiled = profile(work, discovery, dataset.to_data(), settings=settings, progress=False)
    curvature = profiled.curvature
    generator = torch.Generator().manual_seed(seed)
    vectors = {n: torch.randn(curvature.shape(n), generator=generator) for n in profiled.names}
    products = {
        "full HVP": lambda: curvature.hvp(vectors),
        "block HVP, all layers": lambda: curvature.block_hvps({n: [v] for n, v in vectors.items()}),
    }
    split = hvp.split_convolutions
    seconds: dict[str, dict[str, list[float]]] = {k: {"split": [], "plain": []} for k in products}
    products["full HVP"]()  # warm-up
    for _ in range(repeats):
        for label, product in products.items():
            for variant in ("split", "plain"):
                hvp.split_convolutions = (
                    split if variant == "split" else lambda model: nullcontext()
                )
                try:
                    seconds[label][variant].append(_timed(product))
                finally:
                    hvp.split_convolutions = split
    timing = {
        label: {
            "split_s": statistics.median(t["split"]),
            "plain_s": statistics.median(t["plain"]),
            "ratio": statistics.median(t["split"]) / statistics.median(t["plain"]),
        }
        for label, t in seconds.items()
    }

    shapes = {n: curvature.shape(n) for n in profiled.names}
    krylov = profiled.krylov()
    estimates = {
        variant: hutchinson_blocks(
            curvature.hvps,
            shapes,
            probes,
            probes,
            0.0,
            torch.Generator().manual_seed(seed + 1),
            deflation=krylov if variant == "deflated" else None,
        )
        for variant in ("plain", "deflated")
    }
    traces = [
        {
            "layer": n,
            **{
                f"{v}_{field}": getattr(estimates[v][n], field)
                for v in estimates
                for field in ("trace", "trace_stderr")
            },
        }
        for n in profiled.names
    ]
    for row in traces:
        row["stderr_ratio"] = row["plain_trace_stderr"] / row["deflated_trace_stderr"]
    return {
        **environment(model_name, dataset, seed),
        "repeats": repeats,
        "probes": probes,
        "lanczos_iterations": settings.lanczos_iterations,
        "timing": timing,
        "traces": traces,
    }


def markdown(r: dict) -> str:
    ratios = sorted(row["stderr_ratio"] for row in r["traces"])
    lines = [
        f"# Profile engine speed-ups: {r['model']} on {r['dataset']}",
        "",
        f"Command: `{r['command']}`  ",
        f"torch {r['torch']}, {r['threads']} threads, {r['calibration_samples']} calibration "
        f"samples; median of {r['repeats']} interleaved repeats.",
        "",
        "| product | split convolutions (s) | plain double backward (s) | ratio |",
        "|---|---|---|---|",
        *(
            f"| {label} | {t['split_s']:.2f} | {t['plain_s']:.2f} | {t['ratio']:.2f} |"
            for label, t in r["timing"].items()
        ),
        "",
        f"Trace standard error after {r['probes']} shared probes, plain over deflated by "
        f"{r['lanczos_iterations']} Lanczos iterations, across layers: median "
        f"{statistics.median(ratios):.1f}x, range {ratios[0]:.1f}x to {ratios[-1]:.1f}x.",
        "",
        "| layer | plain trace | ± se | deflated trace | ± se | se ratio |",
        "|---|---|---|---|---|---|",
        *(
            f"| {t['layer']} | {t['plain_trace']:.3g} | {t['plain_trace_stderr']:.2g} "
            f"| {t['deflated_trace']:.3g} | {t['deflated_trace_stderr']:.2g} "
            f"| {t['stderr_ratio']:.1f} |"
            for t in r["traces"]
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-resnet20")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.calibration, args.seed, args.repeats, args.probes)
    result["command"] = command()
    write_json(RESULTS / f"{args.model}-hvp-cost.json", result)
    text = markdown(result)
    atomic_write(RESULTS / f"{args.model}-hvp-cost.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()

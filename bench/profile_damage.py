"""Predicted vs measured loss change of every single-layer quantization candidate, per error model.

For each compressible layer and bit-width 2..8 (per-channel round-to-nearest), the perturbation is
applied alone, the calibration loss change is measured (and the held-out test loss change), and
every error model's prediction is compared with it by Spearman rank correlation over all
(layer, bits) candidates. The cost of each profile part is reported in seconds and as a multiple of
one plain forward+backward sweep over the calibration set, timed in the same run.

    python bench/profile_damage.py --model mnist-resnet20
    python bench/profile_damage.py --model mnist1d-cnn
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from common import RESULTS, command, save_figure
from scipy.stats import spearmanr

from allot.api import prepare
from allot.data import Data
from allot.discover import get_weight
from allot.errors import ERROR_MODELS
from allot.files import atomic_write, write_json
from allot.modules.base import dense_weight
from allot.profile.engine import Profile, Settings
from allot.profile.measure import loss_change, mean_loss
from allot.schemes import Quant
from allot.zoo import create_model, get_dataset, get_entry
from allot.zoo.data import SplitBatches

BITS = range(2, 9)
MODELS = ("second-order", "trace", "diagonal", "output", "weight")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run(model_name: str, calibration: int, seed: int, probes: int) -> dict:
    dataset = get_dataset(get_entry(model_name).dataset, calibration_size=calibration, seed=seed)
    work, _, discovery, _ = prepare(create_model(model_name))
    data = dataset.to_data()
    held_out = Data(SplitBatches(dataset.test, dataset.batch_size), data.loss)
    settings = Settings(probes_min=8, probes_max=probes, rel_tol=0.05, seed=seed)
    profile = Profile(work, discovery.layers, data, settings=settings, progress=False)

    # One plain forward+backward sweep, the unit of cost (timed twice, the faster kept).
    def sweep() -> None:
        weights = list(work.parameters())
        for batch in data.batches():
            torch.autograd.grad(data.loss(data.outputs(work, batch), batch), weights)

    unit = min(timed(sweep)[1] for _ in range(2))

    deltas, labels = {}, []
    with torch.no_grad():
        for layer in discovery.layers:
            weight, bias = get_weight(work, layer.name)
            deltas[layer.name] = [
                dense_weight(Quant(b).compress(weight, bias, layer.spec)) - weight for b in BITS
            ]
            labels += [(layer.name, b) for b in BITS]

    costs = {}
    _, costs["input statistics"] = timed(lambda: profile.inputs(discovery.layers[0].name))
    _, costs["gradient"] = timed(lambda: profile.gradient(discovery.layers[0].name))
    _, costs["Lanczos iterations"] = timed(profile.eigenpairs)
    _, costs["deflated Hutchinson trace+diagonal"] = timed(profile.hessian_estimates)
    predictions = {}
    for name in MODELS:
        damages, seconds = timed(lambda name=name: ERROR_MODELS[name].damages(deltas, profile))
        predictions[name] = [d for layer in discovery.layers for d in damages[layer.name]]
        if name == "second-order":
            costs["exact HVP per candidate"] = seconds

    reference = mean_loss(work, data)
    reference_test = mean_loss(work, held_out)
    measured, measured_test = [], []
    for layer in discovery.layers:
        for delta in deltas[layer.name]:
            change = {layer.name: delta}
            measured.append(loss_change(work, change, data, reference))
            measured_test.append(loss_change(work, change, held_out, reference_test))

    rows = []
    for name in MODELS:
        rows.append(
            {
                "error_model": name,
                "spearman_calibration": float(spearmanr(predictions[name], measured).statistic),
                "spearman_held_out": float(spearmanr(predictions[name], measured_test).statistic),
            }
        )
    estimates = profile.hessian_estimates()
    return {
        "model": model_name,
        "dataset": dataset.name,
        "calibration_samples": len(dataset.calibration),
        "layers": len(discovery.layers),
        "candidates": len(labels),
        "seed": seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "hutchinson_probes": max(e.probes for e in estimates.values()),
        "lanczos_iterations": settings.lanczos_iterations,
        "hutchinson_max_rel_stderr": max(
            e.trace_stderr / abs(e.trace) for e in estimates.values() if e.trace
        ),
        "fb_seconds": unit,
        "costs_seconds": costs,
        "costs_fb": {k: v / unit for k, v in costs.items()},
        "fb_equivalents_nominal": profile.curvature.passes.fb_equivalents,
        "rows": rows,
        "points": {
            "labels": [f"{layer}:{bits}" for layer, bits in labels],
            "measured": measured,
            "measured_held_out": measured_test,
            **predictions,
        },
    }


def markdown(r: dict, command: str) -> str:
    total = sum(r["costs_seconds"].values())
    lines = [
        f"# Predicted vs measured loss change: {r['model']} on {r['dataset']}",
        "",
        f"Command: `{command}`  ",
        f"torch {r['torch']}, {r['threads']} threads, {r['calibration_samples']} calibration "
        f"samples, {r['layers']} layers x bits 2..8 = {r['candidates']} single-layer candidates "
        "(per-channel round-to-nearest), each measured alone. Spearman rank correlation of "
        "each error model's prediction with the measured calibration-loss change, and with the "
        "held-out test-loss change.",
        "",
        "| error model | Spearman (calibration) | Spearman (held-out) |",
        "|---|---|---|",
        *(
            f"| {row['error_model']} | {row['spearman_calibration']:.3f} "
            f"| {row['spearman_held_out']:.3f} |"
            for row in r["rows"]
        ),
        "",
        f"Cost, in seconds and in multiples of one forward+backward sweep over the calibration "
        f"set ({r['fb_seconds']:.2f} s here):",
        "",
        "| part | seconds | x forward+backward |",
        "|---|---|---|",
        *(
            f"| {part} | {sec:.1f} | {r['costs_fb'][part]:.0f} |"
            for part, sec in r["costs_seconds"].items()
        ),
        f"| **full profile** | {total:.1f} | {total / r['fb_seconds']:.0f} |",
        "",
        f"Hutchinson: {r['hutchinson_probes']} shared probes deflated by "
        f"{r['lanczos_iterations']} Lanczos iterations per layer, largest relative standard error of "
        f"a layer trace {r['hutchinson_max_rel_stderr']:.2f}.",
        "",
        f"![scatter]({r['model']}-profile.png)",
        "",
    ]
    return "\n".join(lines)


def scatter(r: dict, path: Path) -> None:
    points = r["points"]
    fig, axes = plt.subplots(1, len(MODELS), figsize=(3.2 * len(MODELS), 3.2))
    for ax, name in zip(axes, MODELS, strict=True):
        ax.scatter(points[name], points["measured"], s=6)
        ax.set_xscale("symlog", linthresh=1e-6)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xlabel(f"predicted ({name})", fontsize=8)
        ax.set_ylabel("measured dL (calibration)", fontsize=8)
    save_figure(fig, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--probes", type=int, default=32, help="most Hutchinson probes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.calibration, args.seed, args.probes)
    result["command"] = command()
    write_json(RESULTS / f"{args.model}-profile.json", result)
    scatter(result, RESULTS / f"{args.model}-profile.png")
    text = markdown(result, result["command"])
    atomic_write(RESULTS / f"{args.model}-profile.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()

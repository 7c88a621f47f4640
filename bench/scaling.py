"""How the cost of profile + scoring + one plan grows with the model's size and the calibration set.

1. Against parameters: the zoo models, and synthetic pre-norm transformers built here from random
   weights (token embedding, `depth` blocks of four width x width attention projections and a
   width x 4 width FFN, a linear classifier on the mean token) at several widths and depths, up to
   about 100M parameters, on random tokens with random labels. Method `rtn-output`: CET's grid
   (round-to-nearest at 1-8 bits, per channel and in groups of 128) scored by the output error
   model |dW x|^2 (input statistics only, no HVPs), knapsack at 4 bits per weight: cheap enough
   to reach 100M parameters in minutes, and every stage but the curvature passes.
2. Against calibration size: mnist-resnet20 at several sizes with `cet` (round-to-nearest, exact
   HVP per candidate: the passes over the data are the work that grows with it).

Every point runs in a fresh process (so its peak resident memory is its own) with a watchdog
that stops it past `--memory-limit` GiB of resident memory (reported as not fitting). The
exponent b of seconds ~ a x^b is fitted by least squares in log-log.

    nice python bench/scaling.py --threads 1

Writes bench/results/scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import RESULTS, code_version, command
from stages import MIB, Stopwatch, load, peak_rss
from torch import nn

import allot.api as api
import allot.candidates as candidates
import allot.profile.engine as engine
from allot.budget import Budget
from allot.data import Data, supervised
from allot.files import atomic_write, write_json
from allot.methods.base import Method
from allot.methods.cet import cet_grid
from allot.profile.hvp import Curvature
from allot.zoo import create_model, get_dataset, get_entry

RTN_OUTPUT = Method(
    "rtn-output",
    "CET's round-to-nearest grid, knapsack on the output error model (no HVPs)",
    cet_grid,
    error_model="output",
)
SYNTHETIC = ((256, 2), (512, 4), (768, 6), (1024, 8))
"""(width, depth) of the synthetic transformers: about 1.6M, 12.6M, 42M and 101M weights in
their blocks."""
VOCABULARY, CLASSES, HEADS = 8192, 16, 8
GIB = 2**30


class Block(nn.Module):
    """A pre-norm transformer block: self-attention, then a GELU FFN of 4 x width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, width = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(n, t, HEADS, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        attention = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(attention.transpose(1, 2).reshape(n, t, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Transformer(nn.Module):
    """Token and position embeddings, `depth` blocks, a classifier on the mean token."""

    def __init__(self, width: int, depth: int, length: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCABULARY, width)
        self.positions = nn.Parameter(0.02 * torch.randn(length, width))
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.tokens(tokens) + self.positions[: tokens.shape[1]])
        return self.head(self.norm(x).mean(1))


def synthetic(width: int, depth: int, sequences: int, length: int, seed: int):
    """A random transformer and `sequences` random token sequences with random labels, in
    batches of 8."""
    torch.manual_seed(seed)
    model = Transformer(width, depth, length).eval()
    tokens = torch.randint(VOCABULARY, (sequences, length))
    labels = torch.randint(CLASSES, (sequences,))
    batches = [(tokens[i : i + 8], labels[i : i + 8]) for i in range(0, sequences, 8)]
    data = Data(calibration=batches, loss=supervised(F.cross_entropy), name="random tokens")
    return model, data


def watchdog(limit_bytes: int) -> None:
    """Stop this process (exit status 3) once its resident memory passes `limit_bytes`, so that a
    point too large for the machine does not take other processes' memory."""

    def watch() -> None:
        while True:
            if peak_rss() > limit_bytes:
                print(json.dumps({"exceeded_bytes": limit_bytes}), flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


STAGES = (
    (engine, "input_statistics", "input statistics"),
    (Curvature, "gradient", "gradient sweep"),
    (candidates, "compress_all", "fitting candidates"),
    (engine.Profile, "_second_order", "exact HVPs"),
    (api, "apply", "apply"),
)


def point(args: argparse.Namespace) -> dict:
    """One measurement (run in its own process)."""
    if args.point.startswith("synthetic:"):
        width, depth = (int(x) for x in args.point.split(":")[1:])
        model, data = synthetic(width, depth, args.sequences, args.length, args.seed)
        calibration = args.sequences
    else:
        name, size = args.point.split(":")
        calibration = int(size)
        dataset = get_dataset(get_entry(name).dataset, calibration_size=calibration, seed=args.seed)
        model, data = create_model(name), dataset.to_data()
    method = RTN_OUTPUT if args.method == RTN_OUTPUT.name else args.method
    stopwatch = Stopwatch()
    for owner, name, label in STAGES:
        stopwatch.watch(owner, name, label)
    stopwatch.watch_lookup(api, "get_error_model", ("damages",), "error model: other")
    start = time.perf_counter()
    scored = api.score(model, data, method, seed=args.seed, progress=False)
    scoring_s = time.perf_counter() - start
    api.compress_scored(scored, Budget("avg_bits", 4.0))
    total_s = time.perf_counter() - start
    stopwatch.restore()
    memory = stopwatch.to_json()
    return {
        "point": args.point,
        "method": args.method,
        "calibration": calibration,
        "parameters": sum(p.numel() for p in model.parameters()),
        "compressible_weights": sum(layer.spec.numel for layer in scored.discovery.layers),
        "layers": len(scored.discovery.layers),
        "candidates": sum(len(row) for row in scored.table.candidates),
        "scoring_s": scoring_s,
        "total_s": total_s,
        "start_rss_bytes": memory["start_rss_bytes"],
        "peak_rss_bytes": memory["peak_rss_bytes"],
        "stages": memory["stages"],
    }


def measure(args: argparse.Namespace, spec: str, method: str) -> dict:
    """Run one point in a fresh process; its record, or a record saying it ran out of memory."""
    arguments = [sys.executable, __file__, "--point", spec, "--method", method]
    for flag in ("threads", "seed", "sequences", "length", "memory_limit"):
        arguments += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(arguments, capture_output=True, text=True)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
    record = json.loads(last)
    if done.returncode != 0:
        if "exceeded_bytes" not in record:
            raise SystemExit(f"point {spec} failed:\n{done.stderr[-3000:]}")
        record = {"point": spec, "method": method, **record}
    print(json.dumps({k: v for k, v in record.items() if k != "stages"}), flush=True)
    return record


def exponent(xs: list[float], ys: list[float]) -> float:
    """b of the least-squares fit log y = log a + b log x."""
    b, _ = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(b)


def markdown(result: dict) -> str:
    lines = [
        "# Scaling: cost of profile + scoring + one plan against parameters and calibration size",
        "",
        f"Command: `{result['command']}`  ",
        f"Code {result['code']}, torch {result['torch']}, {result['threads']} thread(s), each "
        "point a fresh process. Run with `nice` on a shared 2-core machine while other "
        "benchmarks ran (load average "
        + ", ".join(f"{x:.2f}" for x in result["load_average"])
        + " at the end, 1/5/15 min): absolute seconds are inflated and noisy.",
        "",
        "Seconds: `score` (fold, discover, profile, fit and score every candidate) and `score` + "
        "`compress_scored` at 4 bits per weight (allocation, apply, the plan's layer costs and "
        "checks). Peak RSS: the process's resident-memory high-water mark from start (Python, "
        "torch, model and data included); *start* is it before `score`.",
        "",
        "## Against parameters",
        "",
        f"Method `{result['parameter_method']}`: {RTN_OUTPUT.description}. Synthetic "
        f"transformers: {result['sequences']} random sequences of {result['length']} tokens, "
        "batches of 8; zoo models at their data sets' calibration sizes shown.",
        "",
        "| model | calibration | parameters | compressible weights | candidates | score s | "
        "score + plan s | start MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["parameters"]:
        if "exceeded_bytes" in r:
            lines.append(
                f"| {r['point']} | | | | | | | | over {r['exceeded_bytes'] / MIB:.0f} (stopped) |"
            )
            continue
        lines.append(
            f"| {r['point']} | {r['calibration']} | {r['parameters']:,} | "
            f"{r['compressible_weights']:,} | {r['candidates']} | {r['scoring_s']:.1f} | "
            f"{r['total_s']:.1f} | {r['start_rss_bytes'] / MIB:.0f} | "
            f"{r['peak_rss_bytes'] / MIB:.0f} |"
        )
    fits = result["fits"]
    lines += ["", *(f"- {text}" for text in fits["parameters"]), "", "## Against calibration size"]
    lines += [
        "",
        f"`{result['calibration_method']}` on mnist-resnet20.",
        "",
        "| calibration | score s | score + plan s | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for r in result["calibration"]:
        lines.append(
            f"| {r['calibration']} | {r['scoring_s']:.1f} | {r['total_s']:.1f} | "
            f"{r['peak_rss_bytes'] / MIB:.0f} |"
        )
    lines += ["", *(f"- {text}" for text in fits["calibration"])]
    return "\n".join(lines) + "\n"


def fit_lines(rows: list[dict], x: str, label: str) -> tuple[list[str], dict]:
    """The fitted exponents of score and score + plan seconds against `x`, as text and values."""
    rows = [r for r in rows if "exceeded_bytes" not in r]
    if len(rows) < 2:
        return [f"{label}: fewer than two points, no fit"], {}
    xs = [r[x] for r in rows]
    values = {key: exponent(xs, [r[key] for r in rows]) for key in ("scoring_s", "total_s")}
    text = [
        f"{label}: seconds ~ {x.replace('_', ' ')}^b with b = {values['scoring_s']:.2f} "
        f"(score), {values['total_s']:.2f} (score + plan), over {len(rows)} points "
        f"({min(xs):,} to {max(xs):,})"
    ]
    return text, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequences", type=int, default=32, help="synthetic calibration set")
    parser.add_argument("--length", type=int, default=128, help="tokens per synthetic sequence")
    parser.add_argument("--zoo", default="mnist1d-cnn:512,mnist-resnet20:512,minilm:32")
    parser.add_argument("--calibrations", default="64,128,256,512")
    parser.add_argument("--parameter-method", default=RTN_OUTPUT.name)
    parser.add_argument("--calibration-method", default="cet")
    parser.add_argument("--memory-limit", type=float, default=10.0, help="GiB per point")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.point:
        watchdog(int(args.memory_limit * GIB))
        print(json.dumps(point(args)), flush=True)
        return
    specs = [*args.zoo.split(","), *(f"synthetic:{w}:{d}" for w, d in SYNTHETIC)]
    by_parameters = [measure(args, spec, args.parameter_method) for spec in specs]
    by_calibration = [
        measure(args, f"mnist-resnet20:{n}", args.calibration_method)
        for n in args.calibrations.split(",")
    ]
    synthetic_rows = [r for r in by_parameters if r["point"].startswith("synthetic:")]
    parameter_text, parameter_fit = fit_lines(
        synthetic_rows, "compressible_weights", "synthetic transformers"
    )
    all_text, all_fit = fit_lines(by_parameters, "compressible_weights", "all models")
    calibration_text, calibration_fit = fit_lines(by_calibration, "calibration", "mnist-resnet20")
    result = {
        "command": command(),
        "code": code_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "sequences": args.sequences,
        "length": args.length,
        "parameter_method": args.parameter_method,
        "calibration_method": args.calibration_method,
        "load_average": load(),
        "parameters": by_parameters,
        "calibration": by_calibration,
        "fits": {
            "parameters": [*parameter_text, *all_text],
            "calibration": calibration_text,
            "values": {
                "synthetic": parameter_fit,
                "all_models": all_fit,
                "calibration": calibration_fit,
            },
        },
    }
    write_json(RESULTS / "scaling.json", result)
    atomic_write(RESULTS / "scaling.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    Path(RESULTS).mkdir(exist_ok=True)
    main()

"""Speed of steering and scoring: the code of a base commit against this tree's, in one run.

1. Steered rounding of every `cet-steer` candidate (bits 1-8, per channel and in groups of 128
   inputs) of each MiniLM Linear shape, on random weights with a random SPD input second moment
   M: the base commit's `allot.schemes.steer` (loaded from git, one candidate at a time, as the
   scoring called it) against `steer_many` (all candidates stacked), interleaved; with how many
   codes differ and the largest relative difference of f = sum_r d_r' M d_r between them.
2. Exact block HVPs of a zoo model, `--vectors` per layer: one second backward per vector (as the
   profile engine runs them) against one batched second backward per layer
   (`torch.autograd.grad(..., is_grads_batched=True)`), interleaved, with their largest relative
   difference. (Measured to decide whether the engine should batch them.)
3. End to end: `allot analyze mnist-resnet20 --method cet-steer --no-cache` (profile and steered
   scoring of every layer), the base commit's source tree (git archive) against this one, each a
   fresh process, interleaved; with the largest relative difference of any predicted damage.

    nice python bench/speed.py --threads 1 --base c18cc2d

Writes bench/results/speed.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPOSITORY, RESULTS, code_version, command

from allot.discover import Layer, LayerSpec
from allot.files import atomic_write, write_json
from allot.methods.cet import steered_grid
from allot.modules.quant import group_count
from allot.schemes.steer import steer_many
from allot.stats import LayerStats

SHAPES = ((384, 384), (1536, 384), (384, 1536))
"""MiniLM-L6's Linear shapes (out, fan_in): attention projections, FFN in, FFN out."""


def base_steer(base: str):
    """The base commit's `allot.schemes.steer` module (it imports the rest of allot from here;
    what it imports did not change)."""
    source = subprocess.run(
        ["git", "show", f"{base}:src/allot/schemes/steer.py"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    directory = Path(tempfile.mkdtemp())
    (directory / "base_steer.py").write_text(source)
    spec = importlib.util.spec_from_file_location("base_steer", directory / "base_steer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(function, *args, **kwargs):
    """Seconds `function(*args, **kwargs)` took, and its result."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def _one_by_one(steer, w, settings, stats):
    """The base commit's scoring: one `steer` call per candidate."""
    return [steer(w, *setting, stats) for setting in settings]


def steering(base: str, seed: int) -> list[dict]:
    old = base_steer(base)
    rows = []
    for out, fan_in in SHAPES:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(out, fan_in, generator=g) / fan_in**0.5
        # inputs with a few dominant directions over isotropic noise, as activations have
        rank = fan_in // 8
        x = torch.randn(4 * fan_in, rank, generator=g, dtype=torch.float64)
        x = x @ torch.randn(rank, fan_in, generator=g, dtype=torch.float64)
        x += 0.3 * torch.randn(4 * fan_in, fan_in, generator=g, dtype=torch.float64)
        stats = LayerStats(x.T @ x, 4 * fan_in)
        second = stats.input_cov / stats.samples
        schemes = steered_grid(Layer("linear", LayerSpec("linear", out, fan_in)))[:-1]  # no Keep
        settings = [(s.bits, group_count(fan_in, s.group), s.grid) for s in schemes]
        old_s, before = _timed(_one_by_one, old.steer, w, settings, stats)
        new_s, after = _timed(steer_many, w, settings, stats)
        differing, worst = 0, 0.0
        for (codes_a, grid_a), (codes_b, grid_b) in zip(before, after, strict=True):
            differing += int((codes_a != codes_b).sum())
            f = []
            for codes, grid in ((codes_a, grid_a), (codes_b, grid_b)):
                low, step = (t.repeat_interleave(fan_in // t.shape[1], 1) for t in grid.levels())
                d = low + step * codes - w.double()
                f.append(((d @ second) * d).sum(1))
            worst = max(worst, float(((f[0] - f[1]).abs() / f[0].clamp(min=1e-300)).max()))
        rows.append(
            {
                "shape": f"{out}x{fan_in}",
                "candidates": len(settings),
                "old_s": old_s,
                "new_s": new_s,
                "ratio": old_s / new_s,
                "codes": sum(c.numel() for c, _ in after),
                "codes_differing": differing,
                "max_relative_f_difference": worst,
            }
        )
        print(rows[-1], flush=True)
    return rows


def hvp_batching(model_name: str, calibration: int, vectors: int, seed: int) -> dict:
    from allot.api import prepare, profile
    from allot.profile.engine import Settings
    from allot.zoo import create_model, get_dataset, get_entry

    dataset = get_dataset(get_entry(model_name).dataset, calibration_size=calibration, seed=seed)
    work, _, discovery, _ = prepare(create_model(model_name))
    profiled = profile(work, discovery, dataset.to_data(), settings=Settings(), progress=False)
    curvature = profiled.curvature
    names = profiled.names
    g = torch.Generator().manual_seed(seed)
    requests = {
        n: [torch.randn(curvature.shape(n), generator=g) for _ in range(vectors)] for n in names
    }

    def batched() -> dict[str, torch.Tensor]:
        sums = {n: torch.zeros(vectors, *curvature.shape(n)) for n in names}
        samples = 0
        with curvature._differentiating(names) as params:
            for n_b, grads in curvature._batch_gradients(params, create_graph=True):
                samples += n_b
                for name, weight, grad in zip(names, params, grads, strict=True):
                    (product,) = torch.autograd.grad(
                        grad,
                        weight,
                        grad_outputs=torch.stack(requests[name]),
                        is_grads_batched=True,
                        retain_graph=True,
                    )
                    sums[name].add_(product, alpha=n_b)
        return {n: s / samples for n, s in sums.items()}

    old_s, before = _timed(curvature.block_hvps, requests)
    new_s, after = _timed(batched)
    worst = max(
        float((after[n][k] - before[n][k]).norm() / before[n][k].norm())
        for n in names
        for k in range(vectors)
    )
    row = {
        "model": model_name,
        "calibration": calibration,
        "layers": len(names),
        "vectors_per_layer": vectors,
        "one_backward_per_vector_s": old_s,
        "batched_s": new_s,
        "ratio": old_s / new_s,
        "max_relative_difference": worst,
    }
    print(row, flush=True)
    return row


def end_to_end(base: str, threads: int, calibration: int) -> dict:
    allot = Path(sys.executable).parent / "allot"
    arguments = [
        *("--threads", str(threads), "--no-progress", "analyze", "mnist-resnet20"),
        *("--method", "cet-steer", "--calibration", str(calibration), "--no-cache"),
    ]
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"old": Path(scratch) / "base", "new": REPOSITORY}
        trees["old"].mkdir()
        archive = subprocess.run(
            ["git", "archive", base, "src"], cwd=REPOSITORY, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(trees["old"])], input=archive, check=True)
        seconds, damages = {}, {}
        for label, tree in trees.items():
            out = Path(scratch) / f"analysis-{label}"
            env = {**os.environ, "PYTHONPATH": str(tree / "src")}
            seconds[label], _ = _timed(
                subprocess.run,
                [str(allot), *arguments, "--out", str(out)],
                env=env,
                check=True,
                capture_output=True,
            )
            layers = json.loads((out / "analysis.json").read_text())["layers"]
            damages[label] = {
                (layer["name"], scheme): value[1]
                for layer in layers
                for scheme, value in layer["candidates"].items()
            }
            print(label, seconds[label], flush=True)
    worst = max(
        abs(damages["old"][k] - damages["new"][k]) / max(abs(damages["old"][k]), 1e-300)
        for k in damages["old"]
    )
    return {
        "command": " ".join([*arguments, "--out", "DIR"]),
        "old_s": seconds["old"],
        "new_s": seconds["new"],
        "ratio": seconds["old"] / seconds["new"],
        "candidates": len(damages["old"]),
        "max_relative_damage_difference": worst,
    }


def markdown(result: dict) -> str:
    lines = [
        "# Speed: steering and scoring, base commit against this tree",
        "",
        f"Command: `{result['command']}`  ",
        f"Code {result['code']} against base {result['base']}, torch {result['torch']}, "
        f"{result['threads']} thread(s), run with `nice` on a shared 2-core machine (other "
        "sessions' benchmarks ran beside it): absolute seconds vary; each ratio is old / new "
        "measured back to back in this one run.",
        "",
        "## Steered rounding of every cet-steer candidate of a MiniLM Linear shape",
        "",
        "Random weights and a random SPD M; all candidates of the shape (7 bit-widths, per "
        "channel and, where 128 divides the fan-in, groups of 128).",
        "",
        "| shape (out x fan_in) | candidates | old s | new s | old / new | codes differing | "
        "max rel. f difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["steering"]:
        lines.append(
            f"| {r['shape']} | {r['candidates']} | {r['old_s']:.1f} | {r['new_s']:.1f} | "
            f"{r['ratio']:.1f}x | {r['codes_differing']} of {r['codes']} | "
            f"{r['max_relative_f_difference']:.1e} |"
        )
    # MiniLM-L6 has 6 blocks of 4 attention projections, one FFN input and one FFN output layer
    block = {"384x384": 4, "1536x384": 1, "384x1536": 1}
    old_s, new_s = (
        sum(block[r["shape"]] * r[key] for r in result["steering"]) for key in ("old_s", "new_s")
    )
    lines.append(
        f"| one MiniLM block (4 x 384x384, 1536x384, 384x1536) | 84 | {old_s:.1f} | "
        f"{new_s:.1f} | {old_s / new_s:.1f}x | | |"
    )
    lines += [
        "",
        "## Exact block HVPs: one second backward per vector against one batched backward",
        "",
        "| model | calibration | layers x vectors | per vector s | batched s | per vector / "
        "batched | max rel. difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["hvp_batching"]:
        lines.append(
            f"| {r['model']} | {r['calibration']} | {r['layers']} x {r['vectors_per_layer']} | "
            f"{r['one_backward_per_vector_s']:.1f} | {r['batched_s']:.1f} | {r['ratio']:.2f}x | "
            f"{r['max_relative_difference']:.1e} |"
        )
    e2e = result.get("end_to_end")
    if e2e:
        lines += [
            "",
            "## End to end: profile and steered scoring of mnist-resnet20",
            "",
            f"`allot {e2e['command']}`, base tree then this tree, each a fresh process.",
            "",
            "| old s | new s | old / new | candidates | max rel. damage difference |",
            "|---|---|---|---|---|",
            f"| {e2e['old_s']:.1f} | {e2e['new_s']:.1f} | {e2e['ratio']:.2f}x | "
            f"{e2e['candidates']} | {e2e['max_relative_damage_difference']:.1e} |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="c18cc2d", help="commit whose code is 'old'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hvp-models", default="mnist-resnet20:128,minilm:8")
    parser.add_argument("--vectors", type=int, default=7, help="HVP vectors per layer")
    parser.add_argument("--e2e-calibration", type=int, default=128, help="0 skips end to end")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    result = {
        "command": command(),
        "code": code_version(),
        "base": args.base,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steering": steering(args.base, args.seed),
        "hvp_batching": [
            hvp_batching(name, int(size), args.vectors, args.seed)
            for name, size in (item.split(":") for item in args.hvp_models.split(","))
        ],
    }
    if args.e2e_calibration:
        result["end_to_end"] = end_to_end(args.base, args.threads, args.e2e_calibration)
    write_json(RESULTS / "speed.json", result)
    atomic_write(RESULTS / "speed.md", markdown(result).encode())


if __name__ == "__main__":
    main()

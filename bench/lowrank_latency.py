"""CPU latency of a model's committed low-rank plans against float, per layer and whole, with and
without allot.runtime's choice of the faster form per layer.

The plans are the rows of bench/results/<model>-lowrank.json (bench/lowrank.py's methods, not its
ablations): one rank per factorized layer. Each is rebuilt from its ranks by the plain SVD fit of
the folded float model, so its factors differ from the committed (whitened, refined) ones but have
the same shapes, which alone set the time; no accuracy is reported here.

- Per layer: every (layer, rank) of the plans on its own input (the folded float model's, at the
  batch size): the dense layer, the first factor alone and both factors (the module's own
  forward), in interleaved rounds (median), as ratios to the dense layer; and the form
  `allot.runtime` chose for it (its own timing, on the first call).
- Per plan: `float` (the model as trained), `float, BatchNorm folded`, `factors` (the artifact as
  loaded: every low-rank layer on its two factors), `factors, bias apart` (the factors as the
  layer ran them before the bias moved into the pointwise product: a matrix product, then the
  bias added in a pass of its own; `SeparateBias`) and `runtime` (`runtime.prepare(model,
  cache=True)`: every low-rank layer on the faster of its factors and their dense product, chosen
  by the first call), timed in one interleaved run; the FLOPs ratio (float MACs over executed MACs)
  of `factors` and of what `runtime` ran.
The load average before and after is recorded: the machine is shared. Writes
bench/results/<model>-lowrank-latency.{json,md}.

    python bench/lowrank_latency.py --model mnist-resnet20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import RESULTS, code_version, command, write_results
from torch import Tensor, nn

from allot import Budget, LayerPlan, Plan, apply, runtime
from allot.api import prepare
from allot.data import forward
from allot.evaluate import macs
from allot.modules.base import CompressedLayer
from allot.modules.lowrank import LowRankLayer
from allot.runtime.lowrank import FasterForm
from allot.runtime.runner import Runner
from allot.schemes import Keep, LowRank
from allot.zoo import create_model, get_dataset, get_entry

METHODS = ("lowrank-compact", "lowrank-lossless", "svd-energy", "svd-llm", "uniform-rank")
REPEATS = 30
WARMUP = 5


def committed_plans(model_name: str) -> list[dict]:
    """The rows of bench/lowrank.py's results for `model_name` made by `METHODS`: method, budget,
    FLOPs ratio and latency ratio measured then, and the rank of each factorized layer."""
    rows = json.loads((RESULTS / f"{model_name}-lowrank.json").read_text())["rows"]
    return [
        {
            "method": row["method"],
            "budget": row["budget"],
            "ratio": row["ratio"],
            "then": {"flops": row["flops_ratio"], "latency": row["latency_ratio"]},
            "ranks": {
                name: int(label[4:].split("-")[0])
                for name, label in row["schemes"].items()
                if label.startswith("rank")
            },
        }
        for row in rows
        if row["method"] in METHODS and "schemes" in row
    ]


def build(model_name: str, ranks: dict[str, int]) -> nn.Module:
    """The folded model with each named layer factorized at its rank (plain SVD fit), the others
    kept."""
    _, folded, discovery, _ = prepare(create_model(model_name))
    layers = [
        LayerPlan(
            layer.name, layer.spec, LowRank(ranks[layer.name]) if layer.name in ranks else Keep()
        )
        for layer in discovery.layers
    ]
    plan = Plan(model_name, "ranks", "none", Budget("lossless"), layers, folded=folded)
    return apply(create_model(model_name), plan)


def layer_inputs(model: nn.Module, inputs, names: set[str]) -> dict[str, Tensor]:
    """The input each named layer of `model` receives on `inputs`."""
    seen: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, args, _o, name=name: seen.__setitem__(name, args[0].detach())
        )
        for name in names
    ]
    with torch.no_grad():
        forward(model, inputs)
    for handle in handles:
        handle.remove()
    return seen


def interleaved(calls: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
    """Median seconds of each call, timed in interleaved rounds after warm-up: `cpu`, the calling
    thread's CPU time (with one thread torch computes in it; time spent waiting for a core while
    other jobs run is not counted), and `wall`, the wall-clock time."""
    seconds: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in calls}
    with torch.no_grad():
        for call in calls.values():
            for _ in range(WARMUP):
                call()
        for _ in range(REPEATS):
            for name, call in calls.items():
                wall, cpu = time.perf_counter(), time.thread_time()
                call()
                seconds[name]["cpu"].append(time.thread_time() - cpu)
                seconds[name]["wall"].append(time.perf_counter() - wall)
    return {
        name: {clock: statistics.median(s) for clock, s in record.items()}
        for name, record in seconds.items()
    }


def per_layer(model_name: str, plans: list[dict], inputs) -> list[dict]:
    """Every (layer, rank) of `plans`: dense, first factor and both factors timed on the layer's
    own input, and the form `runtime` chose."""
    work, _, discovery, _ = prepare(create_model(model_name))
    specs = {layer.name: layer.spec for layer in discovery.layers}
    pairs = sorted({(name, rank) for plan in plans for name, rank in plan["ranks"].items()})
    seen = layer_inputs(work, inputs, {name for name, _ in pairs})
    rows = []
    for name, rank in pairs:
        dense, spec, x = work.get_submodule(name), specs[name], seen[name]
        layer = LowRank(rank).compress(dense.weight.detach(), dense.bias, spec)
        assert isinstance(layer, LowRankLayer)
        first = spec.with_channels(out_features=rank, bias=False)
        v = layer.v.view(first.weight_shape)
        times = interleaved(
            {
                "dense": lambda dense=dense, x=x: dense(x),
                "first factor": lambda first=first, v=v, x=x: first.forward(x, v, None),
                "factors": lambda layer=layer, x=x: layer.factored(x),
            }
        )
        layer.runner = chooser = FasterForm()
        with torch.no_grad():
            layer(x)
        rows.append(
            {
                "layer": name,
                "rank": rank,
                "input": list(x.shape),
                "out": spec.out_features,
                "fan_in": spec.fan_in,
                "flops_ratio": spec.out_features
                * spec.fan_in
                / (rank * (spec.out_features + spec.fan_in)),
                "seconds": times,
                "runtime": chooser.label,
            }
        )
        cpu = {form: t["cpu"] / times["dense"]["cpu"] for form, t in times.items()}
        print(
            f"{name:22s} rank {rank:3d}  FLOPs {rows[-1]['flops_ratio']:.2f}x  first factor "
            f"{cpu['first factor']:.2f}  factors {cpu['factors']:.2f}  runtime: {chooser.label}",
            flush=True,
        )
    return rows


class SeparateBias(Runner):
    """A low-rank layer on its factors with the bias added after the pointwise product, in a pass
    of its own (how `LowRankLayer` ran convolutions until the bias moved into the product)."""

    label = "factors, bias apart"

    def prepare(self, layer: CompressedLayer) -> None:
        assert isinstance(layer, LowRankLayer)

    def run(self, layer: CompressedLayer, x: Tensor) -> Tensor:
        assert isinstance(layer, LowRankLayer)
        spec = layer.spec
        first = spec.with_channels(out_features=layer.rank, bias=False)
        h = first.forward(x, layer.v.view(first.weight_shape), None)
        if spec.kind == "linear":
            return F.linear(h, layer.u, layer.bias)
        dims = len(spec.kernel_size)
        out = torch.matmul(layer.u, h.flatten(-dims)).view(
            *h.shape[: -dims - 1], -1, *h.shape[-dims:]
        )
        return out if layer.bias is None else out + layer.bias.view(-1, *(1,) * dims)


def per_plan(model_name: str, plans: list[dict], inputs) -> list[dict]:
    """Each plan timed as float, folded float, factors and runtime in one interleaved run."""
    float_model = create_model(model_name).eval()
    folded, *_ = prepare(create_model(model_name))
    float_macs = macs(folded, inputs)
    rows = []
    for plan in plans:
        factors = build(model_name, plan["ranks"])
        apart, chosen = build(model_name, plan["ranks"]), build(model_name, plan["ranks"])
        for layer in apart.modules():
            if isinstance(layer, LowRankLayer):
                layer.runner = SeparateBias()
        runtime.prepare(chosen, cache=True)
        with torch.no_grad():
            expected, out = forward(factors, inputs), forward(chosen, inputs)  # runtime chooses
        layout = runtime.describe(chosen)
        variants = {
            "float": float_model,
            "float, BatchNorm folded": folded,
            "factors": factors,
            "factors, bias apart": apart,
            "runtime": chosen,
        }
        seconds = interleaved(
            {name: lambda model=model: forward(model, inputs) for name, model in variants.items()}
        )
        row = {
            **plan,
            "seconds": seconds,
            "flops_factors": float_macs / macs(factors, inputs),
            "flops_runtime": float_macs / macs(chosen, inputs),
            "dense_layers": sum(label == "dense product" for label in layout.values()),
            "factorized_layers": len(plan["ranks"]),
            "max_relative_difference": float((out - expected).norm() / expected.norm()),
            "bias_apart_difference": float(
                (forward(apart, inputs) - expected).norm() / expected.norm()
            ),
        }
        rows.append(row)
        cpu = {name: t["cpu"] / seconds["float"]["cpu"] for name, t in seconds.items()}
        print(
            f"{plan['method']:18s} {plan['budget']:12s} FLOPs {row['flops_factors']:.2f}x -> "
            f"{row['flops_runtime']:.2f}x  CPU time vs float: factors {cpu['factors']:.2f}x, "
            f"runtime {cpu['runtime']:.2f}x ({row['dense_layers']}/{row['factorized_layers']} "
            "dense)",
            flush=True,
        )
    return rows


def _ratio(seconds: dict[str, dict[str, float]], name: str, base: str, clock: str) -> str:
    return f"{seconds[name][clock] / seconds[base][clock]:.2f}x"


def markdown(results: dict) -> str:
    lines = [
        f"# Low-rank latency: {results['model']}, batch {results['batch']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Code: {results['code']}  ",
        f"torch {results['torch']}, {results['threads']} thread(s), CPU capability "
        f"{results['cpu_capability']}; load average (1 min) {results['load'][0]:.2f} before, "
        f"{results['load'][1]:.2f} after, on a 2-core machine shared with other jobs. Times are "
        f"medians of {results['repeats']} interleaved rounds after {results['warmup']} warm-up "
        "calls, as ratios within one run. `CPU`: the timing thread's CPU time (with one thread "
        "torch computes in it), which leaves out the time spent waiting for a core while the "
        "other jobs run: the estimate of an idle machine's latency here; `wall`: wall-clock "
        "time, which on this loaded machine is mostly waiting. Plans: the ranks of "
        f"`bench/results/{results['model']}-lowrank.json`, rebuilt by the plain SVD fit (the "
        "committed factors' shapes, so their time; no accuracy here).",
        "",
        "## Whole model",
        "",
        "Time over `float` (the model as trained); `folded`: float with BatchNorm folded (what "
        "the compressed layers start from); `factors`: every low-rank layer on its two factors "
        "(the artifact as loaded); `bias apart`: the factors with the bias added in a pass of "
        "its own after the pointwise product, as the layer ran before this bench's commit; "
        "`runtime`: `allot.runtime.prepare(model, cache=True)`, each "
        "low-rank layer on the faster of its factors and their dense product (timed by its "
        "first call; `dense`: how many chose the dense product). FLOPs: float MACs over the "
        "MACs executed, by the factors and by what `runtime` ran. `then`: the FLOPs and wall "
        "latency ratios bench/lowrank.py measured (factors against the folded model). `diff`: "
        "relative difference of `runtime`'s outputs from `factors`'.",
        "",
        "| method | budget | FLOPs factors | FLOPs runtime | float CPU (ms) | folded CPU "
        "| bias apart CPU | factors CPU | runtime CPU | factors wall | runtime wall | dense "
        "| then | diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["plans"]:
        s = r["seconds"]
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['flops_factors']:.2f}x "
            f"| {r['flops_runtime']:.2f}x | {1e3 * s['float']['cpu']:.2f} "
            f"| {_ratio(s, 'float, BatchNorm folded', 'float', 'cpu')} "
            f"| {_ratio(s, 'factors, bias apart', 'float', 'cpu')} "
            f"| {_ratio(s, 'factors', 'float', 'cpu')} | {_ratio(s, 'runtime', 'float', 'cpu')} "
            f"| {_ratio(s, 'factors', 'float', 'wall')} | {_ratio(s, 'runtime', 'float', 'wall')} "
            f"| {r['dense_layers']} of {r['factorized_layers']} "
            f"| {r['then']['flops']:.2f}x, {r['then']['latency']:.2f}x "
            f"| {r['max_relative_difference']:.1e} |"
        )
    lines += [
        "",
        "## Per layer",
        "",
        "Each (layer, rank) of the plans on its own input: time of the first factor alone and of "
        "both factors over the dense layer's (below 1 is faster), and the form `allot.runtime` "
        "chose (its own wall-clock timing on the first call).",
        "",
        "| layer | input | out x fan_in | rank | FLOPs | dense CPU (ms) | first factor CPU "
        "| factors CPU | factors wall | runtime |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["layers"]:
        s = r["seconds"]
        shape = "x".join(str(d) for d in r["input"])
        lines.append(
            f"| {r['layer']} | {shape} | {r['out']}x{r['fan_in']} | {r['rank']} "
            f"| {r['flops_ratio']:.2f}x | {1e3 * s['dense']['cpu']:.3f} "
            f"| {_ratio(s, 'first factor', 'dense', 'cpu')} "
            f"| {_ratio(s, 'factors', 'dense', 'cpu')} | {_ratio(s, 'factors', 'dense', 'wall')} "
            f"| {r['runtime']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    plans = committed_plans(args.model)
    dataset = get_dataset(get_entry(args.model).dataset, calibration_size=64, seed=0)
    inputs = dataset.example_inputs(args.batch)
    layers = per_layer(args.model, plans, inputs)
    whole = per_plan(args.model, plans, inputs)
    results = {
        "code": code_version(),
        "command": command(),
        "model": args.model,
        "batch": args.batch,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "repeats": REPEATS,
        "warmup": WARMUP,
        "load": [load_before, os.getloadavg()[0]],
        "plans": whole,
        "layers": layers,
    }
    stem = f"{args.model}-lowrank-latency"
    text = markdown(results)
    write_results(stem, results, text)
    print(text)


if __name__ == "__main__":
    main()

"""Data-parallel profiling: profile + scoring + one plan in one process against `torchrun`.

The same work (score every candidate of the method on the calibration set, then choose, apply and
check the plan for one budget; no disk cache) runs once as one process and once under
`torchrun --nproc_per_node N`, each process at 1 thread, one after the other in this script. Both
must choose the same plan (every layer's scheme); the ratio of the timed sections (scoring and
planning, start-up and loading excluded) and of the processes' wall times is reported.

    python bench/distributed.py --model mnist-resnet20 --method cet --ratio 8 --calibration 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPOSITORY, RESULTS, code_version, command

from allot import Budget, api, distributed
from allot.files import atomic_write, write_json
from allot.zoo import create_model, get_dataset, get_entry


def work(args: argparse.Namespace) -> None:
    """One process's share (under torchrun, or alone): score, plan, and (rank 0) write what it
    found and how long each part took to `args.result`."""
    torch.set_num_threads(1)
    distributed.start(torch.device("cpu"))
    dataset = get_dataset(get_entry(args.model).dataset, calibration_size=args.calibration, seed=0)
    model = create_model(args.model)
    start = time.perf_counter()
    scored = api.score(model, dataset, args.method, model_name=args.model, progress=False)
    scoring = time.perf_counter() - start
    result = api.compress_scored(scored, Budget("ratio", args.ratio))
    planning = time.perf_counter() - start - scoring
    if distributed.is_main():
        record = {
            "processes": distributed.world(),
            "scoring_s": scoring,
            "planning_s": planning,
            "fb_equivalents": scored.profile.curvature.passes.fb_equivalents,
            "plan": [layer.scheme.label() for layer in result.plan.layers],
            "ratio": result.plan.ratio,
            "prediction": result.plan.metadata.get("prediction"),
        }
        write_json(Path(args.result), record)
    distributed.stop()


def launch(args: argparse.Namespace, processes: int, result: Path) -> dict:
    """Run `work` as one plain process or under torchrun; its record plus the wall seconds."""
    worker = [
        str(Path(__file__).resolve()),
        "--worker",
        *("--model", args.model, "--method", args.method),
        *("--ratio", str(args.ratio), "--calibration", str(args.calibration)),
        *("--result", str(result)),
    ]
    if processes == 1:
        line = [sys.executable, *worker]
    else:
        runner = [sys.executable, "-m", "torch.distributed.run"]
        line = [*runner, "--nproc_per_node", str(processes), *worker]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPOSITORY / "src"), *sys.path]),
    }
    start = time.perf_counter()
    subprocess.run(line, env=env, check=True, cwd=REPOSITORY)
    return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - start}


def run(args: argparse.Namespace) -> dict:
    load, code = os.getloadavg(), code_version()  # the code that runs, before anything changes
    with tempfile.TemporaryDirectory() as directory:
        one = launch(args, 1, Path(directory) / "one.json")
        many = launch(args, args.processes, Path(directory) / "many.json")
    timed = [r["scoring_s"] + r["planning_s"] for r in (one, many)]
    return {
        "code": code,
        "model": args.model,
        "method": args.method,
        "ratio_budget": args.ratio,
        "calibration": args.calibration,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average": [load, os.getloadavg()],
        "one": one,
        "many": many,
        "same_plan": one["plan"] == many["plan"],
        "speedup_timed": timed[0] / timed[1],
        "speedup_wall": one["wall_s"] / many["wall_s"],
    }


def markdown(r: dict) -> str:
    one, many = r["one"], r["many"]
    rows = [
        f"| {label} | {x['processes']} | {x['scoring_s']:.1f} | {x['planning_s']:.1f} | "
        f"{x['scoring_s'] + x['planning_s']:.1f} | {x['wall_s']:.1f} | {x['fb_equivalents']} |"
        for label, x in (("one process", one), ("torchrun", many))
    ]
    return "\n".join(
        [
            f"# Data-parallel profiling: {r['model']}, {r['method']} at ratio {r['ratio_budget']}",
            "",
            f"Command: `{r['command']}` (code {r['code']}, torch {r['torch']}). "
            f"{r['calibration']} calibration samples, 1 thread per process, no disk cache; "
            "the two runs one after the other in this script. The machine: "
            f"{r['cpus']} CPUs, load average (1, 5, 15 min) {_load(r['load_average'][0])} "
            f"before and {_load(r['load_average'][1])} after; other processes on it are not "
            "controlled, so a loaded machine shrinks the speed-up (the processes wait for a "
            "core).",
            "",
            "| run | processes | scoring (s) | plan (s) | timed (s) | process wall (s) | "
            "sweeps per rank |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Same plan: **{r['same_plan']}** ({', '.join(one['plan'])}). Speed-up of the timed "
            f"section (scoring and one plan): **{r['speedup_timed']:.2f}x**; of the processes' "
            f"wall time (start-up and loading included): {r['speedup_wall']:.2f}x. "
            "'Sweeps per rank' counts forward+backward equivalents over each rank's share of the "
            "calibration batches.",
            "",
        ]
    )


def _load(values: list[float]) -> str:
    return "/".join(f"{x:.1f}" for x in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-resnet20")
    parser.add_argument("--method", default="cet")
    parser.add_argument("--ratio", type=float, default=8.0)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work(args)
        return
    result = {**run(args), "command": command()}
    name = f"{args.model}-distributed"
    text = markdown(result)
    write_json(RESULTS / f"{name}.json", result)
    atomic_write(RESULTS / f"{name}.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()

"""The profile cache across processes: `allot analyze MODEL` twice on one fresh cache directory.

Both runs are separate processes (`python -m allot_main analyze MODEL`), timed in this one script
on the same machine; the second must find every statistic in the cache and compute no Hessian
product (its work in forward+backward sweeps, as `analyze` prints it, is 0), so its wall time is
start-up, scoring the candidates and printing.

    python bench/cache_hit.py --model mnist-resnet20
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPOSITORY, RESULTS, code_version, command

from allot.files import atomic_write, write_json


def analyze(model: str, cache: Path) -> dict:
    """One `allot analyze` process on `cache`: wall seconds, the work it reports, cache size."""
    env = {
        **os.environ,
        "ALLOT_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join([str(REPOSITORY / "src"), *sys.path]),
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "allot_main", "--no-progress", "analyze", model],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    work = re.search(r"cost: (\d+) forward\+backward equivalents", done.stdout)
    entries = sorted(cache.rglob("*.safetensors"))
    return {
        "seconds": seconds,
        "fb_equivalents": int(work.group(1)) if work else None,
        "cache_entries": len(entries),
        "cache_bytes": sum(p.stat().st_size for p in entries),
    }


def run(model: str) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        cache = Path(directory) / "cache"
        first = analyze(model, cache)
        second = analyze(model, cache)
    return {
        "code": code_version(),
        "model": model,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "first": first,
        "second": second,
        "ratio": second["seconds"] / first["seconds"],
    }


def markdown(r: dict) -> str:
    first, second = r["first"], r["second"]
    return "\n".join(
        [
            f"# Profile cache across processes: `allot analyze {r['model']}` twice",
            "",
            f"Command: `{r['command']}` (code {r['code']}, torch {r['torch']}). Two processes on "
            "one fresh cache directory, timed in the same script; a shared machine, so the "
            "times themselves vary from run to run, their ratio much less.",
            "",
            "| run | wall time (s) | forward+backward equivalents | cache entries | cache MB |",
            "|---|---|---|---|---|",
            *(
                f"| {label} | {run['seconds']:.1f} | {run['fb_equivalents']} | "
                f"{run['cache_entries']} | {run['cache_bytes'] / 2**20:.1f} |"
                for label, run in (("first", first), ("second", second))
            ),
            "",
            f"The second run took **{r['ratio']:.1%}** of the first's wall time and computed no "
            f"gradient or Hessian product ({second['fb_equivalents']} forward+backward "
            "equivalents); what remains is Python and torch start-up, loading the model and the "
            "data, fitting and scoring the candidates from the cached statistics, and printing.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-resnet20")
    args = parser.parse_args()
    result = {**run(args.model), "command": command()}
    name = f"{args.model}-cache-hit"
    write_json(RESULTS / f"{name}.json", result)
    atomic_write(RESULTS / f"{name}.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Mixed-precision quantization Pareto benchmark: allot's allocators side by side at equal size.

Every method runs on the same model, the same calibration data and the same byte accounting
(bits per weight include scales and offsets), post-training only: the allocators at compression
ratios 4, 8, 11 and 16 of the compressible weights, the uniform methods at 2, 3, 4 and 8 bits
(round-to-nearest against steered rounding at equal bits). `cet-gradient` is CET allocating on
the full second-order damage g.d + 1/2 d'Hd instead of 1/2 d'Hd, kept to show what the gradient
term does. All methods share one on-disk profile cache, so curvature is computed once.

The peers (`bench/peers`, installed by `make peers`: AIMET on convolutional models, NNCF, HQQ,
torchao, optimum-quanto and torch's dynamic int8 on linear-layer models) run in the same process on the same folded model and
calibration data, each at its own settings; their stored bits are counted from the tensors they
really hold. `--native` then runs one allot method at every distinct ratio a peer reached, so each
peer point has an allot point of the same size beside it. A peer whose library is not installed is
listed with the one-line reason. Every row has its latency relative to the float model, timed in
interleaved rounds in the same run. Writes bench/results/<out>.{json,md,png}.

`--grids` runs every allot method once per quantization grid (`float-offset`, `zero-point`,
`symmetric`; `allot.modules.quant`): each method's `Quant` candidates are put on that grid, all
else equal, and each row names its grid. `--previous` takes the rows of earlier committed results
files of the same model, calibration size and seed as finished (rows made before grids were an
option are float-offset rows), so a run adds grids beside the committed numbers instead of
replacing them; the table names the commit every resumed row was made at.

    python bench/quant_pareto.py --model mnist-resnet20          # in .venv-aimet (AIMET peers)
    python bench/quant_pareto.py --model mnist1d-cnn             # in .venv-aimet
    python bench/quant_pareto.py --model minilm --calibration 128
    python bench/quant_pareto.py --model minilm --calibration 128 --grids zero-point,symmetric \
        --previous bench/results/minilm-quant-pareto.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from common import RESULTS, Journal, command, environment, save_figure
from peers import Peer, all_peers
from peers.base import ratio as peer_ratio
from torch import nn

from allot import Budget, Scored, compress_scored, score
from allot.api import prepare
from allot.evaluate import latencies, metrics
from allot.exceptions import BudgetError
from allot.files import atomic_write, write_json
from allot.methods import Method, get_method
from allot.methods.cet import cet_grid
from allot.modules.quant import GRIDS
from allot.profile.cache import Cache
from allot.profile.measure import mean_loss
from allot.schemes import Quant
from allot.schemes.quant import DEFAULT_GRID, LEGACY_GRID
from allot.zoo import Dataset, create_model, get_dataset, get_entry

METHODS = (
    "uniform-quant",
    "uniform-steered",
    "uniform-feedback",
    "weight-error-quant",
    "hawq-v2",
    "hawq-v3",
    "cet-gradient",
    "cet",
    "cet-steer",
    "cet-feedback",
)
RATIOS = (4.0, 8.0, 11.0, 16.0)
UNIFORM_BITS = (2, 3, 4, 8)
LATENCY_BATCH = 32
LATENCY_REPEATS = 10
NATIVE_TOLERANCE = 0.01  # peer ratios within 1% share one allot point
CET_GRADIENT = Method(
    "cet-gradient",
    "CET on the full second-order damage g.d + 1/2 d'Hd",
    cet_grid,
    error_model="second-order",
)


Key = tuple[str, str | None, str]
"""A row's identity: (method or peer, quantization grid (None for peers), budget or setting)."""


def row_key(row: dict) -> Key:
    """The identity of a results row; an allot row made before grids were an option is a
    float-offset row (`LEGACY_GRID`)."""
    grid = None if row.get("peer") or "skipped" in row else row.get("quant_grid", LEGACY_GRID)
    return row["method"], grid, row["budget"]


def on_grid(method: Method, grid: str) -> Method:
    """`method` with every `Quant` candidate on `grid`, all else equal."""

    def candidates(layer):
        return [
            dataclasses.replace(s, grid=grid) if isinstance(s, Quant) else s
            for s in method.grid(layer)
        ]

    return dataclasses.replace(method, grid=candidates)


class Bench:
    """One run's shared state: the model, its folded copy, the data, the rows so far.

    Every finished row is also written to `journal` (atomically), and a run started again with the
    same model, calibration size and seed takes its finished rows from there instead of running
    them again, so an interrupted run of hours resumes where it stopped. Rows of the `previous`
    results files (same key) count as finished too."""

    def __init__(
        self,
        model_name: str,
        calibration: int,
        seed: int,
        journal: Path,
        previous: Sequence[Path] = (),
    ) -> None:
        self.key = {"model": model_name, "calibration": calibration, "seed": seed}
        self.journal = Journal(journal, self.key, row_key)
        self.code = self.journal.code
        self.previous = self._previous_rows(previous)
        self.model_name = model_name
        self.seed = seed
        self.model = create_model(model_name)
        self.dataset: Dataset = get_dataset(
            get_entry(model_name).dataset, calibration_size=calibration, seed=seed
        )
        self.work, _, discovery, _ = prepare(self.model)
        self.layers = discovery.layers
        self.head = self.dataset.task.headline
        self.data = self.dataset.to_data()
        self.timing_inputs = self.dataset.example_inputs(LATENCY_BATCH)
        self.float_row = {
            "method": "float",
            "budget": "-",
            "ratio": 1.0,
            "bits_per_weight": 32.0,
            **metrics(self.model, self.data),
            "calibration_loss": mean_loss(self.model, self.data),
        }
        self.rows: list[dict] = [self.float_row]

    def _previous_rows(self, files: Sequence[Path]) -> dict[Key, dict]:
        """The rows of earlier results files of the same run key (later files win)."""
        rows: dict[Key, dict] = {}
        for path in files:
            saved = json.loads(path.read_text())
            key = {k: saved[k] for k in ("model", "seed")}
            key["calibration"] = saved["calibration_samples"]
            if key != self.key:
                raise SystemExit(f"{path} holds rows of another run ({key}, not {self.key})")
            for row in saved["rows"][1:]:
                rows[row_key(row)] = row
        if rows:
            print(f"taking {len(rows)} rows of {', '.join(map(str, files))}", flush=True)
        return rows

    def add(self, row: dict) -> None:
        """Append a finished row, marked with the code that made it, and journal it."""
        self.rows.append(self.journal.add(row))

    def resume(self, method: str, grid: str | None, budget: str) -> bool:
        """Take the row of (method, grid, budget) from the journal or the previous results if an
        earlier run finished it."""
        key = (method, grid, budget)
        row = self.journal.resume(key) or self.previous.get(key)
        if row is not None:
            self.rows.append(row)
        return row is not None

    def record(self, method: str, budget: str, model: nn.Module, ratio: float, **extra) -> dict:
        """Evaluate a compressed model and append its row (metrics, calibration loss, latency)."""
        base, compressed = latencies(
            [self.work, model], self.timing_inputs, repeats=LATENCY_REPEATS, warmup=2
        )
        row = {
            "method": method,
            "budget": budget,
            "ratio": ratio,
            "bits_per_weight": 32.0 / ratio,
            **metrics(model, self.data),
            "calibration_loss": mean_loss(model, self.data),
            "latency_ratio": compressed / base,
            **extra,
        }
        self.add(row)
        delta = 100 * (row[self.head] - self.float_row[self.head])
        print(
            f"{method:20s} {extra.get('quant_grid', ''):12s} {budget:34s} {ratio:6.2f}x  "
            f"{self.head} {row[self.head]:.4f} "
            f"({delta:+.2f} pt)  latency {row['latency_ratio']:.2f}x",
            flush=True,
        )
        return row

    def allot(self, scored: Scored, method: str, grid: str, budget: Budget, scoring: float) -> None:
        """Plan, apply and record one allot budget (or record that it is out of reach)."""
        start = time.perf_counter()
        try:
            result = compress_scored(scored, budget)
        except BudgetError as exc:
            self.add(
                {
                    "method": method,
                    "quant_grid": grid,
                    "budget": budget.describe(),
                    "out_of_reach": str(exc),
                }
            )
            print(f"{method:20s} {grid:12s} {budget.describe():34s} out of reach", flush=True)
            return
        plan = result.plan
        self.record(
            method,
            budget.describe(),
            result.model,
            plan.ratio,
            quant_grid=grid,
            predicted_damage=sum(layer.damage for layer in plan.layers),
            bits={layer.name: layer.scheme.label() for layer in plan.layers},
            prediction=plan.metadata.get("prediction"),
            scoring_seconds=scoring,
            seconds=time.perf_counter() - start,
        )

    def peer(self, peer: Peer) -> None:
        """Every setting of one peer (the finished ones resumed), or, when it cannot run here and
        no earlier run has its rows, one row saying why."""
        reason = peer.unavailable()
        if reason is not None:
            resumed = [self.resume(peer.name, None, s.label) for s in peer.settings()]
            if not any(resumed):
                self.add({"method": peer.name, "budget": "-", "skipped": reason})
                print(f"{peer.name:20s} skipped: {reason}", flush=True)
            return
        for setting in peer.settings():
            if self.resume(peer.name, None, setting.label):
                continue
            start = time.perf_counter()
            run = peer.run(self.work, self.dataset, self.layers, setting)
            seconds = time.perf_counter() - start
            self.record(
                peer.name,
                setting.label,
                run.model,
                peer_ratio(self.work, self.layers, run.stored_bits),
                peer=True,
                version=peer.version(),
                grid=run.grid,
                notes=run.notes,
                bits={name: bits / self.weights(name) for name, bits in run.stored_bits.items()},
                seconds=seconds,
            )

    def all_rows(self) -> list[dict]:
        """This run's rows (made or resumed), then the previous results' rows it did not redo."""
        made = {row_key(row) for row in self.rows[1:]}
        return self.rows + [row for key, row in self.previous.items() if key not in made]

    def weights(self, name: str) -> int:
        return self.work.get_submodule(name).weight.numel()

    def native_ratios(self, lowest: float) -> list[float]:
        """The distinct ratios of at least `lowest` (and above 1x) the peers reached, ascending,
        rounded up to 0.01x so that the allot point never stores more than the peer's."""
        ratios: list[float] = []
        reached = {math.ceil(100 * r["ratio"]) / 100 for r in self.all_rows() if r.get("peer")}
        for r in sorted(r for r in reached if r > max(1.0, lowest)):
            if not ratios or r > ratios[-1] * (1 + NATIVE_TOLERANCE):
                ratios.append(r)
        return ratios


def conv_model(bench: Bench) -> bool:
    return any(layer.spec.kind.startswith("conv") for layer in bench.layers)


def run(
    model_name: str,
    methods: list[str],
    grids: list[str],
    ratios: list[float],
    calibration: int,
    seed: int,
    peers: list[str] | None,
    native: str | None,
    native_from: float,
    journal: Path,
    previous: list[Path],
) -> dict:
    bench = Bench(model_name, calibration, seed, journal, previous)
    targets = "conv" if conv_model(bench) else "linear"
    chosen = [
        peer
        for name, peer in all_peers().items()
        if (peers is None and peer.targets == targets) or (peers is not None and name in peers)
    ]
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = Cache(Path(cache_dir))
        for peer in chosen:
            bench.peer(peer)
        if not bench.native_ratios(native_from):
            native = None
        names = list(dict.fromkeys([*methods, *([native] if native else [])]))
        for grid in grids:
            for method in names:
                recipe = CET_GRADIENT if method == CET_GRADIENT.name else get_method(method)
                budgets = (
                    [Budget("bits", b) for b in UNIFORM_BITS]
                    if recipe.allocator == "uniform"
                    else [Budget("ratio", r) for r in (ratios if method in methods else [])]
                )
                if method == native:
                    listed = [b.value for b in budgets]
                    budgets += [
                        Budget("ratio", r)
                        for r in bench.native_ratios(native_from)
                        if all(abs(r - x) > NATIVE_TOLERANCE * x for x in listed)
                    ]
                budgets = [b for b in budgets if not bench.resume(method, grid, b.describe())]
                if not budgets:
                    continue
                start = time.perf_counter()
                scored = score(
                    bench.model,
                    bench.data,
                    on_grid(recipe, grid),
                    model_name=model_name,
                    seed=seed,
                    cache=cache,
                    progress=False,
                )
                scoring = time.perf_counter() - start
                for budget in budgets:
                    bench.allot(scored, method, grid, budget, scoring)
    versions = {peer.name: peer.version() for peer in chosen if peer.unavailable() is None}
    return {
        **environment(model_name, bench.dataset, seed),
        "code": bench.code,  # at the start: rows made by this run carry the same
        "peers": versions,
        "native": native,
        "native_from": native_from,
        "rows": bench.all_rows(),
    }


def markdown(results: dict, command: str, plot: str) -> str:
    head = results["headline"]
    float_row = results["rows"][0]
    lines = [
        f"# Quantization Pareto: {results['model']} on {results['dataset']}",
        "",
        f"Command: `{command}`  ",
        f"Code: {results.get('code', 'unrecorded')}{resumed_codes(results)}  ",
        f"torch {results['torch']}, {results['threads']} thread"
        f"{'' if results['threads'] == 1 else 's'}, "
        f"{results['calibration_samples']} calibration samples, seed {results['seed']}. "
        "Post-training, no fine-tuning; every method and peer sees the same calibration data. "
        "`ratio` is the compressible weights' float32 bits over their stored bits (codes, scales, "
        "offsets and zero points counted; a peer's codes bit-packed, its scales at the dtype it "
        "holds them; a weight left in float counts 32 bits); bits/weight = 32 / ratio. Latency is "
        f"one forward pass on {LATENCY_BATCH} test inputs relative to the float model, median of "
        f"{LATENCY_REPEATS} interleaved rounds. Float: {head} {float_row[head]:.4f}, calibration "
        f"loss {float_row['calibration_loss']:.4f}.",
        "",
        f"| method | grid | budget | ratio | bits/weight | {head} | delta (pt) | calibration loss "
        "| latency | predicted damage | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted_rows(results["rows"][1:]):
        grid = row_key(r)[1] or ""
        if "out_of_reach" in r or "skipped" in r:
            why = "out of reach" if "out_of_reach" in r else "not run: " + r["skipped"]
            lines.append(f"| {r['method']} | {grid} | {r['budget']} | {why} | | | | | | | |")
            continue
        damage = f"{r['predicted_damage']:.4g}" if "predicted_damage" in r else "-"
        seconds = (
            f"{r['scoring_seconds']:.0f} + {r['seconds']:.0f}"
            if "scoring_seconds" in r
            else f"{r['seconds']:.0f}"
        )
        lines.append(
            f"| {r['method']} | {grid} | {r['budget']} | {r['ratio']:.2f}x "
            f"| {r['bits_per_weight']:.2f} | {r[head]:.4f} "
            f"| {100 * (r[head] - float_row[head]):+.2f} | {r['calibration_loss']:.4f} "
            f"| {r['latency_ratio']:.2f}x | {damage} | {seconds} |"
        )
    lines += [
        "",
        "Predicted damage is in each method's own error-model units (comparable only within a "
        "method): nats of calibration loss for `cet`, `cet-steer` (1/2 d'Hd) and `cet-gradient` "
        "(g.d + 1/2 d'Hd), HAWQ's Omega for `hawq-*`, squared weight error for "
        "`weight-error-quant`, squared output error for the uniform methods; a `-feedback` row "
        "shows its plan's prediction before error feedback re-fits the layers. Seconds are scoring "
        "(once per method) + planning, applying and evaluating one budget; for a peer, its own run. "
        "`grid` is the quantization grid of an allot row's candidates (`allot.modules.quant`): "
        "`float-offset` (a float16 offset, zero off the grid; allot's only grid before integer "
        f"zero points), `zero-point` (an integer zero point) or `symmetric`; `{DEFAULT_GRID}` is "
        "the default of new plans. Timings are from a shared machine.",
    ]
    if results.get("native"):
        lowest = f" from {results['native_from']:g}x up" if results["native_from"] > 0 else ""
        lines += [
            "",
            f"`{results['native']}` also ran at every distinct ratio a peer reached{lowest} "
            "(rounded up to 0.01x), so each of those peer points has an allot point of the same "
            "size or smaller.",
        ]
    peers = [r for r in results["rows"] if r.get("peer")]
    if results.get("peers"):
        lines += ["", "## Peers", ""]
        lines += [f"- {name} {version}" for name, version in results["peers"].items()]
        lines += ["", "| peer | setting | grid and rounding | notes |", "|---|---|---|---|"]
        lines += [
            f"| {r['method']} | {r['budget']} | {cell(r['grid'])} | {cell('; '.join(r['notes']))} |"
            for r in peers
        ]
    lines += ["", f"![pareto]({plot})", ""]
    return "\n".join(lines)


def sorted_rows(rows: list[dict]) -> list[dict]:
    """Peers first, then allot's methods in the order they first appear, each method's grids
    side by side (in `GRIDS` order), budgets in run order within a grid."""
    order = {name: i for i, name in enumerate(dict.fromkeys(r["method"] for r in rows))}

    def key(item: tuple[int, dict]) -> tuple:
        index, row = item
        grid = row_key(row)[1]
        return (
            not row.get("peer") and "skipped" not in row,
            order[row["method"]],
            -1 if grid is None else GRIDS.index(grid),
            index,
        )

    return [row for _, row in sorted(enumerate(rows), key=key)]


def resumed_codes(results: dict) -> str:
    """A note naming the code of rows made by other runs (resumed from the journal), if any."""
    counts: dict[str, int] = {}
    for row in results["rows"][1:]:
        code = row.get("code", "unrecorded")
        if code != results.get("code"):
            counts[code] = counts.get(code, 0) + 1
    if not counts:
        return ""
    made = ", ".join(f"{n} at {code}" for code, n in sorted(counts.items()))
    return f" (rows resumed from earlier runs: {made})"


def cell(text: str) -> str:
    """Text made safe for a markdown table cell."""
    return text.replace("|", "\\|")


def pareto_plot(results: dict, path: Path) -> None:
    head = results["headline"]
    figure, axis = plt.subplots(figsize=(8, 5))
    float_value = results["rows"][0][head]
    axis.axhline(float_value, color="black", linewidth=0.8, linestyle=":", label="float")
    measured = [r for r in results["rows"][1:] if "out_of_reach" not in r and "skipped" not in r]
    names = list(dict.fromkeys(r["method"] for r in measured))
    peers = [n for n in names if any(r.get("peer") for r in measured if r["method"] == n)]
    methods = [n for n in names if n not in peers]
    colours = {
        **{n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(methods)},
        **{n: plt.get_cmap("Dark2")(i % 8) for i, n in enumerate(peers)},
    }
    dashes = {None: "-", **dict(zip(GRIDS, ("--", "-", ":"), strict=True))}
    series = list(dict.fromkeys(row_key(r)[:2] for r in measured))
    several = len({grid for _, grid in series if grid is not None}) > 1
    for name, grid in series:
        points = sorted(
            (r["bits_per_weight"], r[head]) for r in measured if row_key(r)[:2] == (name, grid)
        )
        label = f"{name} ({grid})" if several and grid is not None else name
        if name in peers:
            style = {"marker": "x", "s": 40}
        else:
            style = {"marker": "o", "markersize": 4, "linestyle": dashes[grid]}
        draw = axis.scatter if name in peers else axis.plot
        draw(*zip(*points, strict=True), color=colours[name], label=label, **style)
    axis.set_xlabel("bits per weight (scales, offsets and zero points included)")
    axis.set_ylabel(head)
    axis.set_title(f"{results['model']}: post-training quantization, allot (lines) and peers (x)")
    axis.legend(fontsize=6 if several else 7, ncol=3 if several else 2)
    axis.grid(alpha=0.3)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--peers", help="comma-separated peers (default: every peer for the model's layer kind)"
    )
    parser.add_argument("--no-peers", action="store_true", help="run allot's methods only")
    parser.add_argument(
        "--native",
        default="cet-steer",
        help="allot method also run at each peer's ratio ('' for none)",
    )
    parser.add_argument(
        "--native-from", type=float, default=0.0, help="only peer ratios of at least this"
    )
    parser.add_argument(
        "--grids",
        default=DEFAULT_GRID,
        help=f"comma-separated quantization grids every allot method runs on ({', '.join(GRIDS)})",
    )
    parser.add_argument(
        "--previous",
        default="",
        help="comma-separated results files whose rows count as finished (same model, "
        "calibration size and seed)",
    )
    parser.add_argument("--out", help="results file stem (default: <model>-quant-pareto)")
    args = parser.parse_args()
    grids = [g for g in args.grids.split(",") if g]
    if unknown := sorted(set(grids) - set(GRIDS)):
        parser.error(f"unknown grid(s) {unknown}; known: {', '.join(GRIDS)}")
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    peers = [] if args.no_peers else (args.peers.split(",") if args.peers else None)
    native = args.native or None
    if native not in (None, CET_GRADIENT.name) and get_method(native).allocator == "uniform":
        parser.error(f"--native needs an allocator that meets a ratio; {native} is uniform")
    methods = [m for m in args.methods.split(",") if m]
    stem = args.out or f"{args.model}-quant-pareto"
    journal = RESULTS / f".{stem}.journal.json"
    results = run(
        args.model,
        methods,
        grids,
        ratios,
        args.calibration,
        args.seed,
        peers,
        native,
        args.native_from,
        journal,
        [Path(p) for p in args.previous.split(",") if p],
    )
    results["command"] = command()
    write_json(RESULTS / f"{stem}.json", results)
    pareto_plot(results, RESULTS / f"{stem}.png")
    text = markdown(results, results["command"], f"{stem}.png")
    atomic_write(RESULTS / f"{stem}.md", text.encode())
    journal.unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()

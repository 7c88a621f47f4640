"""Learning-compression benchmark: direct compression against LC on the same plan, with allot's
post-training best (`cet-feedback`) at the same sizes beside them.

Each form is one plan: one scheme in every layer (binary, ternary, adaptive 2-bit, prune 5%,
quantized + sparse), or, for forms whose rank must follow each layer's size, a uniform grid
(one rank fraction everywhere) at the size of the anchor form `quant1+sparse2%` (matched
storage: the single parts of the additive forms, at the same size, are forms too). Per form:
`direct` is the plan applied (no training), `lc` the same plan refined by LC with one schedule
(the refiner's defaults with the zoo recipe's optimiser and learning rate, a tenth of it where
BatchNorm was folded, unless `--lc KEY=VALUE` overrides them); then `cet-feedback` runs at
every distinct ratio the forms reached (rounded up to 0.01x, so it never stores more). Rows are
journaled in bench/results/.<stem>.journal.json and every LC run checkpoints in
bench/results/.<stem>-checkpoints/, so an interrupted run resumes, mid-LC included; a finished
run removes its journal. Writes bench/results/<stem>.{json,md,png}, the stem `<model>-lc`
(`--tag T`: `<model>-lc-T`).

    nice python bench/lc.py --model mnist1d-cnn
    nice python bench/lc.py --model mnist-resnet20 --forms "quant1+sparse2%"
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from common import RESULTS, Journal, command, environment, refine_settings, save_figure

from allot import Budget, Policy, Refinement, compress_scored, score
from allot.api import prepare
from allot.cli import parse_settings
from allot.discover import Layer
from allot.evaluate import metrics
from allot.exceptions import BudgetError
from allot.files import atomic_write, write_json
from allot.methods import Method
from allot.methods.baselines import density_grid, rank_grid
from allot.profile.cache import Cache, default_directory
from allot.profile.measure import mean_loss
from allot.refine.lc import LCSettings
from allot.schemes import Keep, LowRank, Quant, Scheme, Sparse, Sum, parse_scheme
from allot.zoo import create_model, get_dataset, get_entry

ANCHOR = "quant1+sparse2%"
UNREACHED = "out of reach"
"""The variant of a grid form whose smallest plan is larger than the anchor's size."""
FRACTIONS = tuple(k / 64 for k in range(1, 17))


def _rank(layer: Layer, fraction: float) -> int:
    return max(1, round(fraction * min(layer.spec.out_features, layer.spec.fan_in)))


def lowrank_sparse_grid(layer: Layer) -> list[Scheme]:
    """Rank fraction f (the same in every layer) plus the 1% largest residual weights."""
    return [Sum((LowRank(_rank(layer, f)), Sparse(0.01))) for f in FRACTIONS]


def quant_lowrank_grid(layer: Layer) -> list[Scheme]:
    """Scaled signs plus a low-rank correction at rank fraction f (the same in every layer)."""
    return [Sum((Quant(1), LowRank(_rank(layer, f)))) for f in FRACTIONS]


@dataclass(frozen=True)
class Form:
    """A plan: `pin`, one scheme in every layer; or `grid`, a uniform grid at the anchor's size."""

    name: str
    pin: str | None = None
    grid: Callable[[Layer], list[Scheme]] | None = None

    def method(self) -> Method:
        grid = self.grid or (lambda layer: [Keep()])  # a pinned layer never sees the grid
        return Method(self.name, self.name, grid, error_model="weight", allocator="uniform")


FORMS = (
    Form("binary", pin="quant:1"),
    Form("ternary", pin="ternary"),
    Form("adaptive 2-bit", pin="codebook:4"),
    Form("prune 5%", pin="sparse:0.05"),
    Form("quant1+sparse0.5%", pin="quant:1+sparse:0.005"),
    Form("quant1+sparse1%", pin="quant:1+sparse:0.01"),
    Form(ANCHOR, pin="quant:1+sparse:0.02"),
    Form("quant 2-bit", pin="quant:2"),
    Form("sparse", grid=density_grid),
    Form("low-rank", grid=rank_grid),
    Form("low-rank+sparse1%", grid=lowrank_sparse_grid),
    Form("quant1+low-rank", grid=quant_lowrank_grid),
    # steered rounding: error feedback re-fits these, so LC can start from its fit (start=feedback)
    Form("steered binary", pin="quant:1:steered"),
    Form("steered quant1+sparse0.5%", pin="quant:1:steered+sparse:0.005"),
    Form("steered quant1+sparse2%", pin="quant:1:steered+sparse:0.02"),
)
ADDITIVE = {
    ANCHOR: ("quant 2-bit", "sparse"),
    "low-rank+sparse1%": ("low-rank", "sparse"),
    "quant1+low-rank": ("quant 2-bit", "low-rank"),
}
"""Additive forms and their single parts at the same storage (the anchor's)."""


class Bench:
    """One model's run: its data, the rows so far, and the journal they resume from."""

    def __init__(
        self, model_name: str, settings: dict, calibration: int, seed: int, stem: str
    ) -> None:
        self.model_name, self.seed = model_name, seed
        self.model = create_model(model_name)
        # the zoo recipe's optimiser and rate (a tenth where BatchNorm was folded), unless given
        recipe = refine_settings(model_name, bool(prepare(self.model)[1]), 1)
        settings = {"lr": recipe["lr"], "optimizer": recipe["optimizer"], **settings}
        self.settings = dataclasses.asdict(LCSettings(**settings))
        self.key = {"model": model_name, "calibration": calibration, "seed": seed, **settings}
        self.journal = Journal(
            RESULTS / f".{stem}.journal.json",
            self.key,
            lambda row: (row["form"], row["variant"]),
        )
        self.checkpoints = RESULTS / f".{stem}-checkpoints"
        self.code = self.journal.code
        self.dataset = get_dataset(
            get_entry(model_name).dataset, calibration_size=calibration, seed=seed
        )
        self.data = self.dataset.to_data()
        self.head = self.dataset.task.headline
        self.float_row = {"form": "float", "variant": "float", "ratio": 1.0}
        self.float_row.update(self.measure(self.model))
        self.rows = [self.float_row]

    def measure(self, model: torch.nn.Module) -> dict:
        return {**metrics(model, self.data), "calibration_loss": mean_loss(model, self.data)}

    def add(self, row: dict) -> None:
        self.rows.append(self.journal.add(row))
        if self.head not in row:
            return
        delta = 100 * (row[self.head] - self.float_row[self.head])
        print(
            f"{row['form']:20s} {row['variant']:13s} {row['ratio']:6.2f}x  {self.head} "
            f"{row[self.head]:.4f} ({delta:+.2f} pt)  {row.get('seconds', 0):.0f} s",
            flush=True,
        )

    def resume(self, form: str, variant: str) -> bool:
        row = self.journal.resume((form, variant))
        if row is not None:
            self.rows.append(row)
        return row is not None

    def anchor_ratio(self) -> float:
        """The anchor form's ratio, which the grid forms are held to."""
        layers = prepare(self.model)[2].layers
        scheme = parse_scheme(next(f.pin for f in FORMS if f.name == ANCHOR) or "")
        bits = sum(scheme.storage_bits(layer.spec) for layer in layers)
        return 32 * sum(layer.spec.numel for layer in layers) / bits

    def form(self, form: Form, anchor: float) -> None:
        """The direct and LC rows of one form."""
        if self.resume(form.name, UNREACHED):
            return
        have_direct, have_lc = self.resume(form.name, "direct"), self.resume(form.name, "lc")
        if have_direct and have_lc:
            return
        policy = Policy.parse(pins=[f"*={form.pin}"]) if form.pin else None
        scored = score(
            self.model,
            self.data,
            form.method(),
            policy=policy,
            model_name=self.model_name,
            seed=self.seed,
            progress=False,
        )
        budget = Budget("ratio", 1.0 if form.pin else anchor)
        if not have_direct:
            start = time.perf_counter()
            try:
                direct = compress_scored(scored, budget, Refinement(None))
            except BudgetError as exc:  # the form's grid cannot reach the anchor's size
                self.add({"form": form.name, "variant": UNREACHED, "reason": str(exc)})
                return
            self.add(self.row(form, "direct", direct, time.perf_counter() - start))
        if not have_lc:
            folder = form.name.replace("%", "pct").replace(" ", "_")
            settings = {
                **self.settings,
                "checkpoint": str(self.checkpoints / folder),
                "resume": True,
            }
            start = time.perf_counter()
            refined = compress_scored(scored, budget, Refinement("lc", settings))
            row = self.row(form, "lc", refined, time.perf_counter() - start)
            row["history"] = refined.plan.metadata["lc"]["history"]
            self.add(row)

    def row(self, form: Form, variant: str, result, seconds: float) -> dict:
        labels = sorted({layer.scheme.label() for layer in result.plan.layers})
        return {
            "form": form.name,
            "variant": variant,
            "ratio": result.plan.ratio,
            "schemes": labels,
            **self.measure(result.model),
            "seconds": seconds,
        }

    def post_training(self) -> None:
        """cet-feedback at every distinct ratio the forms reached."""
        reached = sorted({math.ceil(100 * r["ratio"]) / 100 for r in self.rows[1:] if "ratio" in r})
        budgets = [r for r in reached if not self.resume("cet-feedback", f"{r:.2f}x")]
        if not budgets:
            return
        scored = score(
            self.model,
            self.data,
            "cet-feedback",
            model_name=self.model_name,
            seed=self.seed,
            cache=Cache(default_directory()),
            progress=False,
        )
        for ratio in budgets:
            start = time.perf_counter()
            try:
                result = compress_scored(scored, Budget("ratio", ratio))
            except BudgetError as exc:  # a form smaller than cet-feedback's smallest plan
                self.add({"form": "cet-feedback", "variant": UNREACHED, "reason": str(exc)})
                continue
            row = self.row(Form("cet-feedback"), f"{ratio:.2f}x", result, 0.0)
            row["seconds"] = time.perf_counter() - start
            self.add(row)


def run(
    model_name: str,
    settings: dict,
    calibration: int,
    seed: int,
    forms: list[str] | None = None,
    stem: str | None = None,
) -> dict:
    bench = Bench(model_name, settings, calibration, seed, stem or f"{model_name}-lc")
    anchor = bench.anchor_ratio()
    for form in FORMS:
        if forms is None or form.name in forms:
            bench.form(form, anchor)
    bench.post_training()
    return {
        **environment(model_name, bench.dataset, seed),
        "code": bench.code,
        "lc_settings": bench.settings,
        "anchor_ratio": anchor,
        "rows": bench.rows,
    }


def by_variant(results: dict, variant: str) -> dict[str, dict]:
    return {r["form"]: r for r in results["rows"] if r["variant"] == variant}


def acceptance(results: dict) -> list[str]:
    """The issue's targets, as measured by this run."""
    head, float_value = results["headline"], results["rows"][0][results["headline"]]
    direct, lc = by_variant(results, "direct"), by_variant(results, "lc")
    lines = []
    within = [
        f"{name} ({r['ratio']:.1f}x: {100 * (r[head] - float_value):+.2f} pt)"
        for name, r in lc.items()
        if "quant1+sparse" in name and r["ratio"] >= 14
    ]
    lines.append("- quantized (1 bit) + <= 2% sparse at >= 14x, LC: " + ", ".join(within))
    ratios = []
    for name, r in lc.items():
        lost_direct = float_value - direct[name][head]
        if lost_direct > 0:
            ratios.append(f"{name} {(float_value - r[head]) / lost_direct:.2f}")
    lines.append("- LC's loss / direct compression's loss (target <= 0.3): " + ", ".join(ratios))
    for whole, parts in ADDITIVE.items():
        if whole in lc and all(p in lc for p in parts):
            beats = all(lc[whole][head] > lc[p][head] for p in parts)
            singles = ", ".join(f"{p} {lc[p][head]:.4f}" for p in parts)
            lines.append(
                f"- {whole} {lc[whole][head]:.4f} vs its parts at equal storage ({singles}): "
                + ("beats each" if beats else "does not beat each")
            )
    best = max((r for r in lc.values() if r["ratio"] >= 24), key=lambda r: r[head], default=None)
    if best is not None:
        lines.append(
            f"- best LC form at >= 24x: {best['form']} ({best['ratio']:.1f}x) "
            f"{100 * (best[head] - float_value):+.2f} pt (target within 1 pt)"
        )
    return lines


def markdown(results: dict, command: str, plot: str) -> str:
    head = results["headline"]
    float_row = results["rows"][0]
    s = results["lc_settings"]
    epochs = s["steps"] * s["epochs"]
    direct, lc = by_variant(results, "direct"), by_variant(results, "lc")
    post = [r for r in results["rows"] if r["form"] == "cet-feedback"]
    lines = [
        f"# LC against direct compression: {results['model']} on {results['dataset']}",
        "",
        f"Command: `{command}`  ",
        f"Code: {results['code']}  ",
        f"torch {results['torch']}, {results['threads']} threads, "
        f"{results['calibration_samples']} calibration samples, seed {results['seed']}. "
        f"Float: {head} {float_row[head]:.4f}. Training budget of every LC run: {s['steps']} "
        f"L steps of {s['epochs']} epoch(s) = {epochs} epochs over the training split "
        f"(mu = {s['mu0']:g} x {s['growth']:g}^k, {s['optimizer']} at lr {s['lr']:g}, "
        f"{s['schedule']} within each L step, "
        f"{'augmented Lagrangian' if s['multipliers'] else 'quadratic penalty'}"
        f"{', rates relative to each tensor RMS' if s.get('relative') else ''}"
        f"{', penalty scaled per layer' if s.get('scaled') else ''}, "
        f"start: {s.get('start', 'direct')}). `LC start` is the model LC starts from (step 0: "
        "the plan applied, or error feedback's fit of it with start=feedback). "
        "`direct` is the same plan applied without training; `cet-feedback` is allot's best "
        "post-training method at the same ratio or smaller. Seconds on a shared 2-core machine "
        "(other jobs running), for comparison within this run only.",
        "",
        f"| form | schemes | ratio | direct {head} | LC start {head} | LC {head} | LC delta (pt) "
        f"| LC loss / direct loss | cet-feedback at that ratio | LC seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in lc.items():
        d = direct[name]
        lost = float_row[head] - d[head]
        share = f"{(float_row[head] - r[head]) / lost:.2f}" if lost > 0 else "-"
        match = next(
            (p for p in post if p["variant"] == f"{math.ceil(100 * r['ratio']) / 100:.2f}x"),
            None,
        )
        schemes = (
            ", ".join(r["schemes"]) if len(r["schemes"]) <= 2 else f"{len(r['schemes'])} kinds"
        )
        started = r["history"][0]["metrics"][head]
        lines.append(
            f"| {name} | {schemes} | {r['ratio']:.2f}x | {d[head]:.4f} | {started:.4f} "
            f"| {r[head]:.4f} | {100 * (r[head] - float_row[head]):+.2f} | {share} "
            f"| {f'{match[head]:.4f}' if match else '-'} | {r['seconds']:.0f} |"
        )
    unreached = [r for r in results["rows"] if r["variant"] == UNREACHED]
    if unreached:
        lines += ["", "Not run, out of reach at that size:", ""]
        lines += [f"- {r['form']}: {r['reason']}" for r in unreached]
    lines += ["", "## Targets (issue 22)", "", *acceptance(results), "", f"![lc]({plot})", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    head = results["headline"]
    float_value = results["rows"][0][head]
    figure, (sizes, steps) = plt.subplots(1, 2, figsize=(13, 5))
    for variant, style in (("direct", "o"), ("lc", "s")):
        rows = by_variant(results, variant)
        for i, (name, r) in enumerate(rows.items()):
            sizes.scatter(
                32 / r["ratio"],
                r[head],
                marker=style,
                color=plt.get_cmap("tab20")(i % 20),
                label=name if variant == "lc" else None,
                facecolors="none" if variant == "direct" else None,
            )
    post = sorted(
        (32 / r["ratio"], r[head])
        for r in results["rows"]
        if r["form"] == "cet-feedback" and r["variant"] != UNREACHED
    )
    if post:
        sizes.plot(*zip(*post, strict=True), "k--x", label="cet-feedback (post-training)")
    sizes.axhline(float_value, color="black", linewidth=0.8, linestyle=":")
    sizes.set_xlabel("bits per weight (open: direct compression, filled: LC)")
    sizes.set_ylabel(head)
    sizes.legend(fontsize=7)
    sizes.grid(alpha=0.3)
    for i, (name, r) in enumerate(by_variant(results, "lc").items()):
        points = [(h["step"], h["metrics"][head]) for h in r["history"]]
        steps.plot(*zip(*points, strict=True), color=plt.get_cmap("tab20")(i % 20), label=name)
    steps.axhline(float_value, color="black", linewidth=0.8, linestyle=":")
    steps.set_xlabel("LC step (0: direct compression)")
    steps.set_ylabel(f"compressed model's {head}")
    steps.grid(alpha=0.3)
    figure.suptitle(f"{results['model']}: direct compression vs LC")
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--lc", action="append", default=[], metavar="KEY=VALUE", help="an LC setting"
    )
    parser.add_argument(
        "--forms",
        help="comma-separated forms to run (default: all); a run of a few forms on a "
        "model whose epochs are long",
    )
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", help="suffix of the results' names: <model>-lc-TAG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = parse_settings(args.lc, "--lc")
    forms = args.forms.split(",") if args.forms else None
    if forms and (unknown := sorted(set(forms) - {f.name for f in FORMS})):
        parser.error(f"unknown forms {unknown}; known: {', '.join(f.name for f in FORMS)}")
    name = f"{args.model}-lc" + (f"-{args.tag}" if args.tag else "")
    results = run(args.model, settings, args.calibration, args.seed, forms, name)
    results["command"] = command()
    stem = RESULTS / name
    write_json(stem.with_suffix(".json"), results)
    plot(results, stem.with_suffix(".png"))
    atomic_write(
        stem.with_suffix(".md"), markdown(results, results["command"], stem.name + ".png").encode()
    )
    (RESULTS / f".{name}.journal.json").unlink(missing_ok=True)
    print(markdown(results, results["command"], stem.name + ".png"))


if __name__ == "__main__":
    main()

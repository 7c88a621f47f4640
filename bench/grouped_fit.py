"""Grouped fits on a model's real layers: the damped output error of the plain fit (each group's
SVD, ALDS's), of each group's whitened SVD under its own block of the input second moment (no
coupling), of the whitened fit after its first sweep and as `Grouped(k, j, "whitened")` stores
it (at most `SWEEPS` sweeps), of the descent run to 100 sweeps, and the lower bound no grouped fit
can pass (the whitened truncation at rank k j); with each fit's relative operator-norm error.

For every layer and every group count k among its divisors up to 16, the rank j is the largest
whose storage is at most a quarter of the float layer's (75% removed), at least 1. The errors are
tr(D (M + lam I) D') on the model's calibration inputs (M their second moment, lam as the fit
damps it), shown relative to the plain fit's. Writes bench/results/<model>-grouped-fit.{md,json}

    nice python bench/grouped_fit.py --model mnist-resnet20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import command, environment, write_results

from allot.api import prepare
from allot.discover import fold_weight_2d, get_weight
from allot.errors import spectral_norm
from allot.profile.engine import Profile
from allot.schemes import Grouped, Keep
from allot.schemes.grouped import SWEEPS, GroupedWhitening, divisors, svd_factors
from allot.schemes.lowrank import Whitened
from allot.zoo import create_model, get_dataset, get_entry

LONG = 100
LARGEST_GROUPS = 16
SHARE = 0.25


def _product(u: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    rank = u.shape[1] // groups
    blocks = torch.einsum(
        "okj,kjm->okm", u.view(u.shape[0], groups, rank), v.view(groups, rank, -1)
    )
    return blocks.reshape(u.shape[0], -1)


def run(model_name: str, calibration: int, seed: int) -> dict:
    model = create_model(model_name)
    work, _, discovery, _ = prepare(model)
    dataset = get_dataset(get_entry(model_name).dataset, calibration_size=calibration, seed=seed)
    profile = Profile(work, discovery.layers, dataset.to_data(), progress=False)
    rows = []
    for layer in discovery.layers:
        spec = layer.spec
        weight = fold_weight_2d(get_weight(work, layer.name)[0]).double()
        stats = profile.inputs(layer.name)
        whole = Whitened.of(weight, stats)
        top = spectral_norm(weight)
        for groups in [k for k in divisors(spec.in_features) if k <= LARGEST_GROUPS]:
            limit = SHARE * Keep().storage_bits(spec)
            fitting = [
                j
                for j in range(1, Grouped(groups, 1).full_rank(spec) + 1)
                if Grouped(groups, j).storage_bits(spec) <= limit
            ]
            rank = max(fitting, default=1)
            whitening = GroupedWhitening.of(weight, stats, groups)
            fits = [svd_factors(block, rank) for block in weight.chunk(groups, dim=1)]
            plain = torch.cat([u.double() @ v.double() for u, v in fits], dim=1)
            start = time.perf_counter()
            u, v, errors = whitening.fit(rank)
            seconds = time.perf_counter() - start
            long_errors = whitening.fit(rank, sweeps=LONG, tolerance=0.0)[2]
            base = whitening.output_error(plain)
            width = weight.shape[1] // groups
            uncoupled = torch.cat(
                [
                    torch.matmul(*Whitened.under(block, cholesky, whitening.damping).factors(rank))
                    for block, cholesky in zip(
                        weight.split(width, dim=1), whitening.choleskys, strict=True
                    )
                ],
                dim=1,
            )
            rows.append(
                {
                    "layer": layer.name,
                    "groups": groups,
                    "rank": rank,
                    "plain": base,
                    "uncoupled": whitening.output_error(uncoupled) / base,
                    "first_sweep": errors[0] / base,
                    "whitened": errors[-1] / base,
                    "sweeps": len(errors),
                    "long": long_errors[-1] / base,
                    "lower_bound": whole.discarded(min(groups * rank, weight.shape[0])) / base,
                    "operator_plain": spectral_norm(plain - weight) / top,
                    "operator_whitened": spectral_norm(_product(u, v, groups) - weight) / top,
                    "seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    return {**environment(model_name, dataset, seed), "rows": rows}


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = [
        f"# Grouped fits: {results['model']} on {results['dataset']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Code: {results['code']}  ",
        f"torch {results['torch']}, {results['threads']} thread(s), "
        f"{results['calibration_samples']} calibration samples, seed {results['seed']}. Every "
        f"layer, every k <= {LARGEST_GROUPS} dividing its input channels, j the largest rank "
        f"storing at most {SHARE:.0%} of the float layer. Output errors tr(D (M + lam I) D') "
        "relative to the plain fit's: `uncoupled` each group's whitened SVD under its own "
        "diagonal block M_ii (no coupling), `first` after the whitened fit's first sweep, "
        "`whitened` as "
        f"stored (at most {SWEEPS} sweeps, stopping below a 0.1% gain), `{LONG} "
        f"sweeps` the descent run on, `bound` the whitened rank-k j truncation (no grouped fit "
        "is below it). `op.` the relative operator-norm error |W_hat - W|_2 / |W|_2.",
        "",
        "| layer | k | j | plain error | uncoupled | first | whitened | sweeps | 100 sweeps "
        "| bound | op. plain | op. whitened | fit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['groups']} | {r['rank']} | {r['plain']:.4g} "
            f"| {r['uncoupled']:.3f} | {r['first_sweep']:.3f} | {r['whitened']:.3f} | {r['sweeps']} | {r['long']:.3f} "
            f"| {r['lower_bound']:.3f} | {r['operator_plain']:.3f} "
            f"| {r['operator_whitened']:.3f} | {r['seconds']:.3f} |"
        )
    grouped = [r for r in rows if r["groups"] > 1]
    lines += [
        "",
        f"Over the {len(grouped)} rows with k > 1, relative to the plain fit's output error "
        "(median, largest): "
        + ", ".join(
            f"{name} {statistics.median(r[key] for r in grouped):.3f}, "
            f"{max(r[key] for r in grouped):.3f}"
            for name, key in (
                ("uncoupled", "uncoupled"),
                ("first sweep", "first_sweep"),
                ("whitened", "whitened"),
                (f"{LONG} sweeps", "long"),
                ("bound", "lower_bound"),
            )
        )
        + "; relative operator-norm error (smallest, largest): "
        + ", ".join(
            f"{name} {min(r[key] for r in grouped):.3f}, {max(r[key] for r in grouped):.3f}"
            for name, key in (("plain", "operator_plain"), ("whitened", "operator_whitened"))
        )
        + f"; the whitened fit took at most {max(r['seconds'] for r in rows):.2f} s a candidate.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-resnet20")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args.model, args.calibration, args.seed)
    results["command"] = command()
    stem = f"{args.model}-grouped-fit"
    text = markdown(results)
    write_results(stem, results, text)
    print(text)


if __name__ == "__main__":
    main()

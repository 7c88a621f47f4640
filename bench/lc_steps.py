"""One LC run of one scheme pinned in every layer, printing each step: mu, the L step's loss, the
constraint gap (summed, and the worst layer's own) and the compressed model's metrics. For
looking at an LC schedule's trajectory; bench/lc.py is the benchmark.

    nice python bench/lc_steps.py --model mnist-resnet20 --scheme quant:1+sparse:0.02 \
        --lc steps=20 --lc epochs=1 --lc optimizer=sgd --lc lr=0.01 --lc mu0=1
"""

from __future__ import annotations

import argparse
import time

import torch

from allot import Budget, Policy, Refinement, compress_scored, score
from allot.cli import parse_settings
from allot.methods import Method
from allot.schemes import Keep
from allot.zoo import create_model, get_dataset, get_entry

PINNED = Method("pinned", "the policy's scheme in every layer", lambda layer: [Keep()], "weight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--scheme", required=True, help="e.g. quant:1:steered+sparse:0.02")
    parser.add_argument("--lc", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = parse_settings(args.lc, "--lc")
    model = create_model(args.model)
    dataset = get_dataset(
        get_entry(args.model).dataset, calibration_size=args.calibration, seed=args.seed
    )
    data = dataset.to_data()
    scored = score(
        model,
        data,
        PINNED,
        policy=Policy.parse(pins=[f"*={args.scheme}"]),
        model_name=args.model,
        seed=args.seed,
        progress=False,
    )
    start = time.perf_counter()
    result = compress_scored(scored, Budget("ratio", 1.0), Refinement("lc", settings))
    for h in result.plan.metadata["lc"]["history"]:
        measured = {k: round(v, 4) for k, v in h["metrics"].items()}
        print(
            f"{h['step']} mu {h['mu']:.3g} loss {h['train_loss']} gap {h['gap']:.4f} "
            f"worst {h['worst_gap']:.4f} {measured}",
            flush=True,
        )
    print(f"ratio {result.plan.ratio:.2f}x, seconds {time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    main()

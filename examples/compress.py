"""Compress the example's model on its data from Python, save the artifact, load it back.

python examples/compress.py weights.safetensors out/example
"""

from __future__ import annotations

import sys

import torch
from data import calibration, signals
from model import make
from safetensors.torch import load_file

import allot
from allot.evaluate import metrics


def main(weights: str, out: str) -> None:
    model = make()
    model.load_state_dict(load_file(weights))
    data = calibration()
    # CET bit-widths per layer at 8x smaller weights; the last layer (24 -> 1) stays in float
    result = allot.compress(
        model, data, "cet-steer", allot.Budget("ratio", 8), policy=allot.Policy.parse(keep=["4"])
    )
    allot.save(result.model, result.plan, out)
    again, plan = allot.load(out, model_factory=make)  # our own factory: nothing is imported
    noisy = signals(4, seed=9).tensors[0]
    with torch.no_grad():
        assert torch.equal(again(noisy), result.model(noisy))
    print(f"float:      {metrics(model, data)}")
    print(f"compressed: {metrics(again, data)} at {plan.ratio:.2f}x")
    print("plan:", ", ".join(f"{layer.name} {layer.scheme.label()}" for layer in plan.layers))


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""Evaluate: held-out metrics, sizes, multiply-accumulates and CPU latency.

Sizes (see README, "Compression ratio"):
- `weight_ratio`: float32 bits of all compressible weights / the bits their compressed form stores
  (codes, scales, offsets, indices, factors all counted).
- `file_bytes`: bytes of the safetensors file on disk (header included); `file_ratio` compares it with
  the float model's safetensors file written the same way.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from allot.data import Data, Inputs, forward
from allot.exceptions import DataError
from allot.files import save_weights
from allot.modules.base import CompressedLayer

_FLOAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def metrics(model: nn.Module, data: Data) -> dict[str, float]:
    """The data's held-out metrics of `model` (headline first), or {} when the data has no
    held-out evaluation. `DataError` when the evaluation fails or returns anything but a dict of
    numbers."""
    if data.evaluate is None:
        return {}
    try:
        result = data.evaluate(model.eval())
    except DataError:
        raise
    except Exception as exc:  # the user's evaluation failed on the user's model
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(
            f"the held-out evaluation failed: {type(exc).__name__}: {message}".rstrip(": ")
        ) from exc
    if not isinstance(result, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in result.items()
    ):
        raise DataError(
            f"the held-out evaluation must return a dict of metric names to numbers, got {result!r:.80}"
        )
    return {k: float(v) for k, v in result.items()}


def state_bits(model: nn.Module) -> int:
    """Bits of every tensor in the model's state dict, at its stored width."""
    return 8 * sum(t.numel() * t.element_size() for t in model.state_dict().values())


def file_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's safetensors file, written as an artifact writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_weights(model, path)
        return path.stat().st_size


def parameter_count(model: nn.Module) -> int:
    """Number of values the model stores: packed integer codes count one per weight they encode,
    so a quantized layer has as many parameters as its float original."""
    total = 0
    for module in model.modules():
        if isinstance(module, CompressedLayer):  # compressed layers are leaves
            total += module.parameter_count()
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def macs(model: nn.Module, inputs: Inputs) -> int:
    """Multiply-accumulates of one forward pass on `inputs` (all samples), as the model executes it:
    a factorized layer counts both factors; quantized and sparse layers dequantize and count dense."""
    return sum(executed for _, executed in layer_macs(model, inputs).values())


def layer_macs(model: nn.Module, inputs: Inputs) -> dict[str, tuple[int, int]]:
    """Per layer (float Linear/Conv or compressed, by qualified name): the multiply-accumulates of
    one forward pass on `inputs` as a dense float layer of its geometry computes them, and as the
    layer executes them (different only for layers that run smaller operations, such as the two
    factors of a low-rank layer)."""
    counts: dict[str, tuple[int, int]] = {}

    def count(name: str):
        def hook(module: nn.Module, _args: tuple[Any, ...], output: Tensor) -> None:
            if isinstance(module, CompressedLayer):
                dense, executed = output.numel() * module.spec.fan_in, module.macs(output)
            else:  # float layer: every output element costs fan_in (per group) MACs
                dense = executed = output.numel() * (
                    module.weight.numel() // module.weight.shape[0]
                )
            before = counts.get(name, (0, 0))
            counts[name] = (before[0] + dense, before[1] + executed)

        return hook

    handles = [
        module.register_forward_hook(count(name))
        for name, module in model.named_modules()
        if isinstance(module, (*_FLOAT_LAYERS, CompressedLayer))
    ]
    try:
        with torch.no_grad():
            forward(model.eval(), inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def layer_parameters(model: nn.Module, names: list[str]) -> dict[str, int]:
    """The numbers each named layer stores for its weight (as `parameter_count` counts them,
    bias excluded)."""
    counts = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, CompressedLayer):
            counts[name] = module.weight_parameter_count()
        else:
            counts[name] = module.weight.numel()
    return counts


def latency(model: nn.Module, inputs: Inputs, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall-clock seconds of one forward pass on `inputs` (after warm-up), CPU."""
    return latencies([model], inputs, repeats, warmup)[0]


def latencies(
    models: list[nn.Module], inputs: Inputs, repeats: int = 30, warmup: int = 5
) -> list[float]:
    """Median seconds per forward pass of each model, timed in interleaved rounds (model 1, model 2,
    ..., repeat) so that a change in machine load affects all of them alike; use it for ratios."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            model.eval()
            for _ in range(warmup):
                forward(model, inputs)
        for _ in range(repeats):
            for model, record in zip(models, times, strict=True):
                start = time.perf_counter()
                forward(model, inputs)
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]

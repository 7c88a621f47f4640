"""How a compressed model runs on CPU, by explicit choice.

By default every compressed layer rebuilds its dense weight from the stored form on every call
(`dequantize`): exact, and at the memory of the compressed form, but slower than float. Two
switches, both off unless asked for, change that for inference (calls without gradients):

- `kernels=True`: quantized Linear layers whose layout a low-bit kernel runs use it
  (`allot.runtime.kernels`: torch's weight-only int4 kernel for 1-4 bits, int8 for 5-8 bits per
  channel); they keep only packed codes and tables, and compute with bfloat16 activations, so
  their outputs differ from the dequantized layer's by about 0.2% relative;
- `cache=True`: every other layer that rebuilds its weight keeps its dense float32 weight
  (`CachedWeight`): the float operation exactly, at the memory of a float layer; and every
  low-rank layer runs whichever of its two factors and the dense product of them (computed once,
  kept only where it runs) the first call with each input shape measures faster
  (`allot.runtime.lowrank.FasterForm`): where two small operations lose to one, the layer runs
  at the speed of its float layer rather than slower.

Without `cache`, low-rank layers run their two factors. `release` returns a model to its default
(rebuilding weights on every call, low-rank layers on their factors). Nothing here changes the
stored tensors, the state dict or a saved artifact.

    from allot import runtime
    runtime.prepare(model, kernels=True, cache=True)   # {layer: what runs}
"""

from __future__ import annotations

from torch import nn

from allot.modules.base import CompressedLayer
from allot.modules.lowrank import Bottleneck
from allot.runtime.kernels import kernel_for
from allot.runtime.lowrank import FasterForm
from allot.runtime.runner import CachedWeight, Runner

DEQUANTIZE = "dequantize"
OWN = "own operations"


def _layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """The outermost compressed layers (a sum's parts run inside it)."""
    found: dict[str, CompressedLayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedLayer) and not any(
            name.startswith(f"{outer}.") for outer in found
        ):
            found[name] = module
    return found


def prepare(model: nn.Module, *, kernels: bool = False, cache: bool = False) -> dict[str, str]:
    """Choose how every compressed layer of `model` runs in inference (see the module docstring);
    returns what each runs, by layer name. Calling it again replaces the earlier choice."""
    for layer in _layers(model).values():
        runner: Runner | None = None
        if kernels:
            runner = kernel_for(layer)
        if runner is None and cache and layer.rebuilds_weight:
            runner = CachedWeight()
        elif runner is None and cache and isinstance(layer, Bottleneck):
            runner = FasterForm()
        layer.runner = runner
    return describe(model)


def cache_weights(model: nn.Module) -> dict[str, str]:
    """Keep every compressed layer's dense weight (no kernels), and run every low-rank layer in
    its faster form: float speed or better, the float operation's outputs."""
    return prepare(model, cache=True)


def release(model: nn.Module) -> None:
    """Back to rebuilding every weight on every call (frees cached weights and kernel tensors)."""
    for layer in _layers(model).values():
        layer.runner = None


def describe(model: nn.Module) -> dict[str, str]:
    """What computes each compressed layer in inference: a runner's label (for a low-rank layer
    under `cache`, the form its calls chose so far), `dequantize`, or `own operations` (a layer
    with its own forward, such as low-rank factors)."""
    return {
        name: layer.runner.label
        if layer.runner is not None
        else (DEQUANTIZE if layer.rebuilds_weight else OWN)
        for name, layer in _layers(model).items()
    }

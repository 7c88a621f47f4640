"""Runners: what computes a compressed layer's outputs when `allot.runtime` is asked to speed it
up, instead of rebuilding the dense weight from its stored form on every call.

A runner prepares tensors once from the layer's stored form and uses them on every call (without
gradients: `CompressedLayer.forward` calls it only then). It prepares them again whenever a stored
tensor of the layer has changed since (changed in place, as `load_state_dict` or an optimizer step
does, or replaced), so it never computes with a stale copy.
"""

from __future__ import annotations

import abc

from torch import Tensor, nn

from allot.modules.base import CompressedLayer


def stored_tensors(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of `module` and its children (a sum's parts), in a fixed order."""
    found = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    for child in module._modules.values():
        if child is not None:
            found += stored_tensors(child)
    return found


class Runner(abc.ABC):
    """Computes a layer's outputs from tensors prepared from its stored form. `label` says what
    runs, for reports."""

    label: str = ""

    def __init__(self) -> None:
        self._stored: list[Tensor] = []
        self._versions: list[int] = []

    def __call__(self, layer: CompressedLayer, x: Tensor) -> Tensor:
        if not self._current(layer):
            self.prepare(layer)
            self._stored = stored_tensors(layer)  # held, so no new tensor can take their ids
            self._versions = [t._version for t in self._stored]
        return self.run(layer, x)

    def _current(self, layer: CompressedLayer) -> bool:
        """Whether the layer still stores the very tensors prepared from, unchanged since."""
        stored = stored_tensors(layer)
        return (
            bool(self._stored)
            and len(stored) == len(self._stored)
            and all(a is b for a, b in zip(stored, self._stored, strict=True))
            and all(t._version == v for t, v in zip(stored, self._versions, strict=True))
        )

    @abc.abstractmethod
    def prepare(self, layer: CompressedLayer) -> None:
        """Build the tensors `run` uses from the layer's stored form."""
        ...

    @abc.abstractmethod
    def run(self, layer: CompressedLayer, x: Tensor) -> Tensor:
        """The layer's outputs on `x`, from the prepared tensors."""
        ...


class CachedWeight(Runner):
    """The dense float32 weight, rebuilt once and kept: the layer then runs exactly the float
    operation (same outputs as rebuilding it on every call), at the memory of a float weight."""

    label = "cached weight"

    def prepare(self, layer: CompressedLayer) -> None:
        self.weight = layer.reconstruct().detach().contiguous()

    def run(self, layer: CompressedLayer, x: Tensor) -> Tensor:
        return layer.spec.forward(x, self.weight, layer.bias)

"""What a peer adapter is, and the storage accounting every peer row shares with allot's rows.

A peer adapter quantizes a copy of a (BatchNorm-folded) model with the peer library's own code and
settings, and reports, for every allot layer whose weight it replaced, the bits that weight really
occupies in the peer's form: its codes at their bit-width (the bit-packed equivalent when the peer
keeps codes in wider integers), and its scales, zero points and any group metadata at the dtypes
the peer stores them in. Weights the peer leaves in float count 32 bits each, as in allot's plans.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from allot.discover import Layer, get_weight
from allot.exceptions import ConfigError
from allot.zoo.data import Dataset


@dataclass(frozen=True)
class Setting:
    """One configuration of a peer, as a row of the benchmark names it (`label`)."""

    label: str
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass
class PeerRun:
    """A peer's compressed model and the honest storage of the weights it compressed.

    `stored_bits[name]` is the bits of layer `name`'s weight storage (codes + scales + zero points
    + metadata); `grid` says how the peer chose its grid and rounding (rows differ there, and a fair
    comparison says which each uses); `notes` lists anything the reader must know (layers skipped,
    a setting the peer changed).
    """

    model: nn.Module
    stored_bits: dict[str, int]
    grid: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Peer:
    """A peer library: its pip distribution, the layer kinds it targets ("conv" models or
    "linear" ones), its settings, and `run(model, dataset, layers, setting) -> PeerRun`, which
    works on a copy and may import the library only when called; `extra` is allot's optional
    dependency group that installs it."""

    name: str
    distribution: str
    targets: str
    settings: Callable[[], list[Setting]]
    run: Callable[[nn.Module, Dataset, list[Layer], Setting], PeerRun]
    modules: tuple[str, ...] = ()
    extra: str = "peers"

    def version(self) -> str:
        """The installed distribution's version; ConfigError when it is not installed."""
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError as exc:
            raise ConfigError(
                f"peer {self.name!r} needs {self.distribution}: pip install -e '.[{self.extra}]'"
            ) from exc

    def unavailable(self) -> str | None:
        """One line saying why this peer cannot run here, or None when it can."""
        try:
            self.version()
            for module in self.modules:
                importlib.import_module(module)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"{self.name}: {first}"
        return None


def tensor_bits(tensor: Tensor) -> int:
    """Bits a tensor occupies as stored: elements x element size."""
    return tensor.numel() * tensor.element_size() * 8


def packed_bits(count: int, bits: int) -> int:
    """Bits of `count` codes of `bits` bits each, bit-packed."""
    if bits < 1:
        raise ConfigError(f"codes need at least 1 bit, got {bits}")
    return count * bits


def weight_count(model: nn.Module, layers: list[Layer]) -> int:
    """Number of compressible weights (allot's layers) of `model`."""
    return sum(get_weight(model, layer.name)[0].numel() for layer in layers)


def ratio(float_model: nn.Module, layers: list[Layer], stored_bits: Mapping[str, int]) -> float:
    """float32 bits of the compressible weights over their stored bits, as allot's `plan.ratio`:
    a layer missing from `stored_bits` stays in float (32 bits per weight)."""
    unknown = sorted(set(stored_bits) - {layer.name for layer in layers})
    if unknown:
        raise ConfigError(f"stored bits given for layers that are not compressible: {unknown}")
    total = 0
    for layer in layers:
        count = get_weight(float_model, layer.name)[0].numel()
        total += stored_bits.get(layer.name, 32 * count)
    return 32 * weight_count(float_model, layers) / total


def option(setting: Setting, key: str, allowed: Collection[object]) -> object:
    """The value of `setting.options[key]`; ConfigError naming the allowed values when it is
    missing or not one of them."""
    if key not in setting.options:
        raise ConfigError(f"setting {setting.label!r} has no {key!r} option")
    value = setting.options[key]
    if value not in allowed:
        choices = ", ".join(str(choice) for choice in allowed)
        raise ConfigError(f"setting {setting.label!r}: {key}={value!r} is not one of {choices}")
    return value


def linear_layers(
    model: nn.Module, layers: list[Layer], group_size: int | None = None
) -> tuple[list[str], list[str]]:
    """The names of the allot layers a Linear-only, group-wise peer can quantize, and one note per
    layer it must leave in float: layers that are not `nn.Linear`, and, when `group_size` is given,
    layers whose input width (weights per row) is not a multiple of it."""
    names: list[str] = []
    notes: list[str] = []
    for layer in layers:
        module = model.get_submodule(layer.name)
        if not isinstance(module, nn.Linear):
            notes.append(f"{layer.name}: {type(module).__name__} is not Linear; kept in float")
        elif group_size is not None and module.in_features % group_size:
            notes.append(
                f"{layer.name}: {module.in_features} inputs are not a multiple of group "
                f"{group_size}; kept in float"
            )
        else:
            names.append(layer.name)
    return names, notes

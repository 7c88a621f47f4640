"""Schemes: how one layer is compressed, with which parameters, and what that costs.

A scheme is a frozen dataclass registered by its `kind`. It knows:
- `storage_bits(spec)`: exact storage of the compressed weight in bits, counting every stored tensor
  (codes, scales, offsets, indices, factors, codebooks) at its stored width, rounded up to whole
  bytes per tensor exactly as saved. The layer's bias is not counted (it stays float and is counted
  with the model's other parameters).
- `compress(weight, bias, spec, profile)`: fit itself to a float weight and return the module that
  really stores the compressed form; a scheme that fits to data reads the layer's calibration
  `LayerProfile` (statistics are computed on first use, so other schemes cost nothing).
- `empty(spec)`: the same module with uninitialised storage, to load an artifact into.
- `check(spec)`: raise `ConfigError` when it cannot apply to a layer (a rank above full rank, a
  group size that does not divide the fan-in).
- `refits` / `refit(target, bias, spec, stats)`: whether, and how, it fits itself again to a target
  weight under other input second moments (error feedback re-fits every layer that can).
- `project(target, bias, spec, previous)`: LC's C step, the fit that minimises the plain squared
  weight error |target - Delta|^2 (no calibration data), starting from the `previous` C step's
  module where the fit is iterative (warm start). By default `compress` without a profile.
- `select(target, spec, price)`: for a family of schemes that differ only in size (low rank: the
  rank), the member minimising |target - Delta|^2 + price * storage_bits (LC's rank selection);
  by default the family is the scheme alone.
- `constrains`: whether the scheme constrains the weight at all (LC leaves `Keep` layers free).

A scheme may hold schemes (`Sum` of parts): its JSON nests theirs, its label joins theirs, and its
storage is the exact sum of theirs. `from_params` rebuilds a scheme from its JSON fields; a
composite scheme overrides it to rebuild its parts first.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from allot.discover import Layer, LayerSpec
from allot.exceptions import ConfigError, PlanError
from allot.registry import Registry

if TYPE_CHECKING:
    from allot.profile.engine import LayerProfile
    from allot.stats import LayerStats

SCHEMES: Registry[type[Scheme]] = Registry("scheme")

Grid = Callable[[Layer], list["Scheme"]]
"""A method's candidate schemes for one layer (it sees the layer's name and geometry)."""

MAX_DEPTH = 8
"""Deepest nesting of schemes in schemes accepted from JSON or text."""


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: make a scheme constructible from its JSON and string forms."""
    SCHEMES.add(cls.kind, cls)
    return cls


@dataclasses.dataclass(frozen=True)
class Scheme(abc.ABC):
    """Base of all schemes. Subclasses are frozen dataclasses whose fields are their parameters."""

    kind: ClassVar[str] = ""

    @abc.abstractmethod
    def storage_bits(self, spec: LayerSpec) -> int:
        """Bits the compressed weight of a layer with this spec occupies on disk."""
        ...

    @abc.abstractmethod
    def compress(
        self,
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> nn.Module:
        """Fit to `weight` (shape `spec.weight_shape`) and return the compressed module."""
        ...

    @classmethod
    def compress_many(
        cls,
        schemes: Sequence[Scheme],
        weight: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        profile: LayerProfile | None = None,
    ) -> list[nn.Module]:
        """`compress` of each of `schemes` (all of this class) on the same layer, in order. By
        default one after the other; a class whose fits share work on one layer (steered `Quant`:
        one input second moment for all its bit-widths and groupings) fits them together."""
        return [scheme.compress(weight, bias, spec, profile) for scheme in schemes]

    @abc.abstractmethod
    def empty(self, spec: LayerSpec) -> nn.Module:
        """The compressed module's structure, storage uninitialised, for loading a state dict."""
        ...

    def check(self, spec: LayerSpec) -> None:
        """Raise `ConfigError` when the scheme cannot apply to a layer with this spec (by default
        every layer fits)."""
        return None

    @property
    def family(self) -> int | None:
        """The structural family this scheme belongs to, a positive integer, for allocators that
        search over families per layer (ALDS's local step: the number of input-channel groups of
        `Grouped`); None when it belongs to every family (the default: Keep, and schemes with no
        such structure)."""
        return None

    def error_bound(self, weight: Tensor) -> float | None:
        """An upper bound on the relative operator-norm error |W_hat - W|_2 / |W|_2 that
        `compress` leaves on `weight` (of the layer's shape), for schemes that state one; None
        otherwise. Reports show it next to the measured error."""
        return None

    @property
    def refits(self) -> bool:
        """Whether `refit` can fit this scheme to a target under new input statistics."""
        return False

    def refit(
        self, target: Tensor, bias: Tensor | None, spec: LayerSpec, stats: LayerStats
    ) -> nn.Module:
        """The compressed module of this scheme fitted to `target` (a weight of `spec`'s shape)
        under the input second moments `stats`, storing exactly what `compress` stores; only
        schemes whose `refits` is true implement it."""
        raise ConfigError(f"{self.label()} cannot be re-fitted to input statistics")

    def project(
        self,
        target: Tensor,
        bias: Tensor | None,
        spec: LayerSpec,
        previous: nn.Module | None = None,
    ) -> nn.Module:
        """LC's C step: this scheme's module (holding `bias`) fitted to `target` by the plain
        squared weight error |target - Delta|^2, without calibration data. `previous`, this
        scheme's module from the last C step, is where an iterative fit starts (warm start);
        closed-form fits ignore it. By default: `compress` without a profile."""
        return self.compress(target, bias, spec, None)

    def select(self, target: Tensor, spec: LayerSpec, price: float) -> Scheme:
        """The member of this scheme's family (schemes differing only in size, e.g. the ranks of
        a factorisation) minimising |target - Delta|^2 + price * storage_bits(spec), with `price`
        in squared weight units per stored bit (LC's rank selection). By default the family is
        this scheme alone."""
        return self

    @property
    def constrains(self) -> bool:
        """Whether the scheme constrains the weight (LC pulls the weight towards its fit); a
        scheme that stores the float weight as it is (`Keep`) leaves it free."""
        return True

    @property
    def kinds(self) -> str:
        """The compression family a report names: the scheme's kind (`quant`, `rank`,
        `grouped`, `sparse`, `keep`, ...), or a sum's parts' kinds joined by `+`."""
        return self.kind

    def label(self) -> str:
        """Short human-readable name, e.g. `quant4`, `rank12`, `sparse0.05`, `keep`."""
        values = "".join(str(v) for v in dataclasses.astuple(self) if v is not None)
        return f"{self.kind}{values}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_params(cls, params: dict[str, Any], where: str, depth: int) -> Scheme:
        """Build from the JSON fields other than `kind`; `PlanError` naming `where` when a field
        is unknown or invalid. `depth` is how deep this scheme sits in other schemes."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(params) - names
        if unknown:
            raise PlanError(
                f"{where}: unknown field(s) {sorted(unknown)!r:.80} for scheme {cls.kind!r}"
            )
        try:
            return cls(**params)
        except (ConfigError, TypeError, ValueError) as exc:
            raise PlanError(f"{where}: {exc}") from exc

    @classmethod
    @abc.abstractmethod
    def parse_args(cls, args: list[str]) -> Scheme:
        """Build from the colon-separated arguments of the string form
        (`quant:4:g64` -> ['4', 'g64'])."""
        ...


def compress_all(
    schemes: Sequence[Scheme],
    weight: Tensor,
    bias: Tensor | None,
    spec: LayerSpec,
    profile: LayerProfile | None = None,
) -> list[nn.Module]:
    """`compress` of every scheme on one layer, in order, each class's schemes fitted together
    by its `compress_many`; every module on the weight's device."""
    classes: dict[type[Scheme], list[int]] = {}
    for index, scheme in enumerate(schemes):
        classes.setdefault(type(scheme), []).append(index)
    modules: dict[int, nn.Module] = {}
    for cls, indices in classes.items():
        fitted = cls.compress_many([schemes[i] for i in indices], weight, bias, spec, profile)
        modules.update(zip(indices, fitted, strict=True))
    return [modules[index].to(weight.device) for index in range(len(schemes))]


def scheme_from_json(data: Any, where: str = "scheme", depth: int = 0) -> Scheme:
    """Rebuild a scheme (and the schemes it holds) from its JSON form; `PlanError` names the bad
    field."""
    if depth > MAX_DEPTH:
        raise PlanError(f"{where}: schemes nest deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict) or "kind" not in data:
        raise PlanError(f"{where}: expected an object with a 'kind' field, got {data!r:.80}")
    params = dict(data)
    kind = params.pop("kind")
    if not isinstance(kind, str) or kind not in SCHEMES:
        raise PlanError(
            f"{where}.kind: unknown scheme {kind!r:.40}; known: {', '.join(SCHEMES.names())}"
        )
    return SCHEMES[kind].from_params(params, where, depth)


def parse_scheme(text: str) -> Scheme:
    """Parse the string form used on the command line: `quant:4`, `quant:4:g64`, `rank:8`,
    `sparse:0.05`, `keep`, and additive combinations joined by `+` (`quant:1+sparse:0.02`)."""
    if "+" in text:
        return SCHEMES["sum"].parse_args([part.strip() for part in text.split("+")])
    kind, *args = text.strip().split(":")
    if kind not in SCHEMES:
        raise ConfigError(
            f"unknown scheme {kind!r:.40} in {text!r:.80}; known: {', '.join(SCHEMES.names())}"
        )
    try:
        return SCHEMES[kind].parse_args(args)
    except (TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"cannot parse scheme {text!r:.80}: {exc!s:.200}") from exc


def fitted_inputs(scheme: Scheme, profile: LayerProfile | None, instead: str) -> LayerStats:
    """The layer's calibration input statistics a data-fitted scheme needs; `ConfigError` naming
    the data-free alternative `instead` when no profile is given."""
    if profile is None:
        raise ConfigError(
            f"{scheme.label()} fits to calibration data: give the layer's profile (allot.api "
            f"compress does), or use {instead}"
        )
    return profile.inputs()


def check_int_field(owner: str, name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise `ConfigError` naming `owner.name` unless `value` is an int (not bool) in low..high."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and (high is None or value <= high):
        return
    bounds = f"in {low}..{high}" if high is not None else f">= {low}"
    raise ConfigError(f"{owner}.{name} must be an int {bounds}, got {value!r:.40}")

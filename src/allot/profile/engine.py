"""The profile of a model on calibration data: every per-layer statistic that error models and
schemes ask for, computed on first use, kept in memory, and cached on disk.

What a `Profile` offers, per compressible layer (all in the calibration loss's units, per weight
unit where a derivative is taken):
- `inputs(name)`: input second moments (`LayerStats`), one forward sweep for all layers;
- `gradient(name)`: g_i, one forward+backward sweep for all layers;
- `eigenpairs()`: the extreme eigenpairs of every H_ii by Lanczos, run for all layers in lock
  step (each iteration shares one forward and first backward);
- `hessian_estimates()`: Hutchinson tr(H_ii) and diag(H_ii) of every layer from shared
  full-model probes (one full HVP per probe serves every layer), deflated by the same Lanczos
  runs: their Krylov space's part is exact, and the probes estimate only the rest;
- `second_order(deltas)`: exact g.d + 1/2 d'H_ii d for any number of weight changes of any layers,
  all sharing one forward and first backward per batch (one second backward per change);
- `measured(deltas)`: the measured calibration-loss change of each weight change, its layer alone
  changed (one forward sweep per change).
The model is profiled as given (fold BatchNorm first), in eval mode. `curvature.passes` counts the
work in forward+backward sweeps over the calibration set.

Cache keys cover the model's weights, the calibration batches, the loss, the layers and the
settings, so a second run on the same inputs loads instead of recomputing (`allot.profile.cache`).
Data come through the data contract (`allot.data`): batches are streamed, one pass per sweep.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from allot import distributed
from allot.data import Data
from allot.discover import Layer
from allot.exceptions import ConfigError
from allot.profile.activations import input_statistics
from allot.profile.cache import Cache, Fingerprint
from allot.profile.damage import SecondOrder, second_order_terms
from allot.profile.hutchinson import Estimate, hutchinson_blocks
from allot.profile.hvp import Curvature
from allot.profile.lanczos import Krylov, Lanczos, RitzPairs
from allot.profile.measure import loss_change, mean_loss
from allot.progress import progress_bar, progress_counter
from allot.stats import LayerStats

_VERSION = "allot-profile-4"
PROBE_ROUND_NUMEL = 2**26
"""Most weights' worth of Hutchinson probes whose products share one forward and first backward
per batch (a round holds a probe and a product per probe: 512 MB at float32 for 2**26)."""
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """How curvature is estimated; part of every cache key.

    Hutchinson draws between `probes_min` and `probes_max` shared probes and stops once every
    layer's trace has a standard error of at most `rel_tol` of its magnitude. Lanczos runs
    `lanczos_iterations` iterations per layer and keeps the `eigenpairs` largest and smallest pairs
    (the residual bound of each says how far it is from converged). `seed` seeds all probes.
    """

    probes_min: int = 8
    probes_max: int = 32
    rel_tol: float = 0.1
    lanczos_iterations: int = 6
    eigenpairs: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.probes_min <= self.probes_max:
            raise ConfigError(
                f"need 2 <= probes_min <= probes_max, got {self.probes_min} and {self.probes_max}"
            )
        if not 1 <= self.eigenpairs <= self.lanczos_iterations:
            raise ConfigError(
                f"need 1 <= eigenpairs <= lanczos_iterations, got {self.eigenpairs} and "
                f"{self.lanczos_iterations}"
            )


class Profile:
    """Lazily computed statistics of `model`'s `layers` on `data`'s calibration batches and loss."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[Layer],
        data: Data,
        *,
        settings: Settings | None = None,
        cache: Cache | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.names = [layer.name for layer in self.layers]
        self.data = data
        self.settings = settings or Settings()
        self.cache = cache or Cache(None)
        self.progress = progress
        self.curvature = Curvature(model, self.names, data)
        self._key: str | None = None
        self._inputs: dict[str, LayerStats] | None = None
        self._gradient: dict[str, Tensor] | None = None
        self._estimates: dict[str, Estimate] | None = None
        self._eigenpairs: dict[str, RitzPairs] | None = None
        self._krylov_runs: dict[str, Krylov] | None = None
        self._terms: dict[str, SecondOrder] = {}  # by fingerprint of (layer, change)
        self._measured: dict[str, float] = {}  # by fingerprint of ("measured", layer, change)

    def layer(self, name: str) -> LayerProfile:
        """A view of one layer's statistics (what schemes that fit to data receive)."""
        if name not in self.names:
            raise ConfigError(f"layer {name!r} is not profiled; profiled layers: {self.names}")
        return LayerProfile(self, name)

    def inputs(self, name: str) -> LayerStats:
        """Input second moments of a layer (one forward sweep computes every layer's)."""
        if self._inputs is None:
            key = self._entry_key("inputs")
            fan_ins = {layer.name: layer.spec.fan_in for layer in self.layers}
            self._inputs = self._cached(key, lambda stored: _unpack_inputs(stored, fan_ins))
            if self._inputs is None:
                self._inputs = input_statistics(self.model, self.layers, self.data, self.progress)
                self.cache.put(key, _pack_inputs(self._inputs))
        return self._inputs[self.layer(name).name]

    def gradient(self, name: str) -> Tensor:
        """g_i = dL/dw_i of a layer (one forward+backward sweep computes every layer's)."""
        if self._gradient is None:
            key = self._entry_key("gradient")
            stored = self._cached(key, lambda stored: _shaped(stored, self._shapes(), ""))
            if stored is None:
                stored = self.curvature.gradient()
                self.cache.put(key, stored)
            self._gradient = stored
        return self._gradient[self.layer(name).name]

    def hessian_estimates(self) -> dict[str, Estimate]:
        """Hutchinson estimates of every layer's tr(H_ii) and diag(H_ii), from shared probes
        deflated by each layer's Lanczos space (so this runs the Lanczos iterations first)."""
        if self._estimates is None:
            key = self._entry_key("hutchinson", asdict(self.settings))
            self._estimates = self._cached(
                key, lambda stored: _unpack_estimates(stored, self._shapes())
            )
            if self._estimates is None:
                s = self.settings
                with progress_counter("Hessian trace probes", self.progress, s.probes_max) as step:

                    def matvecs(probes: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
                        products = self.curvature.hvps(probes)
                        for _ in probes:
                            step()
                        return products

                    self._estimates = hutchinson_blocks(
                        matvecs,
                        {name: self.curvature.shape(name) for name in self.names},
                        s.probes_min,
                        s.probes_max,
                        s.rel_tol,
                        torch.Generator().manual_seed(s.seed + 1),
                        deflation=self.krylov(),
                        round_max=max(1, PROBE_ROUND_NUMEL // self._numel()),
                    )
                self.cache.put(key, _pack_estimates(self._estimates))
        return self._estimates

    def eigenpairs(self) -> dict[str, RitzPairs]:
        """Every layer's extreme Hessian eigenpairs: the `eigenpairs` largest, then the as many
        smallest (most negative first: saddle directions), eigenvectors flattened like the weight."""
        if self._eigenpairs is None:
            key = self._entry_key("lanczos", asdict(self.settings))
            self._eigenpairs = self._cached(
                key, lambda stored: _unpack_pairs(stored, self._shapes())
            )
            if self._eigenpairs is None:
                k = self.settings.eigenpairs
                self._eigenpairs = {
                    name: krylov.pairs(k, "both" if len(krylov.values) >= 2 * k else "largest")
                    for name, krylov in self.krylov().items()
                }
                self.cache.put(key, _pack_pairs(self._eigenpairs))
        return self._eigenpairs

    def second_order(self, deltas: dict[str, list[Tensor]]) -> dict[str, list[SecondOrder]]:
        """Exact g_i.d + 1/2 d'H_ii d for each weight change d (weight-shaped) of each layer.

        Costs one gradient sweep plus one second backward per nonzero change not asked for before,
        all layers together. Results are kept per change, so a plan's changes, which are candidates
        already scored, cost nothing again; an all-zero change (keeping the layer) costs nothing.
        """
        unknown = [name for name in deltas if name not in self.names]
        if unknown:
            raise ConfigError(f"layers {unknown} are not profiled; profiled layers: {self.names}")
        keys = {
            name: [Fingerprint().value(name).tensor(d).hexdigest() for d in ds]
            for name, ds in deltas.items()
        }
        missing: dict[str, dict[str, Tensor]] = {}
        for name, ds in deltas.items():
            for key, delta in zip(keys[name], ds, strict=True):
                if key in self._terms:
                    continue
                if bool(delta.any()):
                    missing.setdefault(name, {})[key] = delta
                else:
                    self._terms[key] = SecondOrder(0.0, 0.0)
        if missing:
            self._terms.update(self._second_order(missing))
        return {name: [self._terms[key] for key in keys[name]] for name in deltas}

    def measured(self, deltas: dict[str, list[Tensor]]) -> dict[str, list[float]]:
        """The measured calibration-loss change L(w + d) - L(w) of each weight change d
        (weight-shaped) of each layer, that layer alone changed (loss units).

        Costs one pass over the calibration data per nonzero change not measured before (and one
        for L(w)); kept per change like `second_order`, on disk too."""
        unknown = [name for name in deltas if name not in self.names]
        if unknown:
            raise ConfigError(f"layers {unknown} are not profiled; profiled layers: {self.names}")
        keys = {
            name: [Fingerprint().value(["measured", name]).tensor(d).hexdigest() for d in ds]
            for name, ds in deltas.items()
        }
        missing = {
            key: (name, delta)
            for name, ds in deltas.items()
            for key, delta in zip(keys[name], ds, strict=True)
            if key not in self._measured and bool(delta.any())
        }
        if missing:
            entry = self._entry_key("measured", sorted(missing))
            stored = self._cached(entry, dict)
            if stored is None:
                reference = mean_loss(self.model, self.data)
                stored = {}
                for key, (name, delta) in progress_bar(
                    list(missing.items()), "measured loss changes", self.progress
                ):
                    change = loss_change(self.model, {name: delta}, self.data, reference)
                    stored[key] = torch.tensor([change], dtype=torch.float64)
                self.cache.put(entry, stored)
            self._measured.update({key: float(value) for key, value in stored.items()})
        return {name: [self._measured.get(key, 0.0) for key in keys[name]] for name in deltas}

    def _second_order(self, missing: dict[str, dict[str, Tensor]]) -> dict[str, SecondOrder]:
        """Second-order terms of nonzero changes {layer: {key: change}}, from the disk cache or
        one lock-step block-HVP pass."""
        entry = self._entry_key("second-order", sorted(k for ds in missing.values() for k in ds))
        wanted = {key: torch.Size([2]) for ds in missing.values() for key in ds}
        stored = self._cached(entry, lambda stored: _shaped(stored, wanted, ""))
        if stored is None:
            count = distributed.shard_size(self.data.batch_count())
            steps = None if count is None else count * sum(len(ds) for ds in missing.values())
            with progress_counter("exact second-order damage", self.progress, steps) as step:
                self.curvature.on_step = step
                try:
                    forms = self.curvature.block_quadratics(
                        {name: list(ds.values()) for name, ds in missing.items()}
                    )
                finally:
                    self.curvature.on_step = lambda: None
            stored = {
                key: torch.tensor(
                    astuple(second_order_terms(self.gradient(name), delta, form)),
                    dtype=torch.float64,
                )
                for name, ds in missing.items()
                for (key, delta), form in zip(ds.items(), forms[name], strict=True)
            }
            self.cache.put(entry, stored)
        return {key: SecondOrder(*value.tolist()) for key, value in stored.items()}

    def krylov(self) -> dict[str, Krylov]:
        """Every layer's Lanczos run, in lock step (each iteration shares one forward and first
        backward); kept in memory only, as it holds `lanczos_iterations` vectors per weight."""
        if self._krylov_runs is None:
            s = self.settings
            generator = torch.Generator().manual_seed(s.seed)
            runs = {
                name: Lanczos(self.curvature.shape(name).numel(), s.lanczos_iterations, generator)
                for name in self.names
            }
            with progress_counter(
                "Lanczos iterations", self.progress, s.lanczos_iterations
            ) as step:
                while active := [name for name, run in runs.items() if not run.done]:
                    queries = {
                        name: [runs[name].query().view(self.curvature.shape(name))]
                        for name in active
                    }
                    for name, (product,) in self.curvature.block_hvps(queries).items():
                        runs[name].update(product.flatten())
                    step()
            self._krylov_runs = {name: run.krylov() for name, run in runs.items()}
        return self._krylov_runs

    def _numel(self) -> int:
        return sum(shape.numel() for shape in self._shapes().values())

    def _shapes(self) -> dict[str, torch.Size]:
        return {name: self.curvature.shape(name) for name in self.names}

    def _cached(self, key: str, unpack: Callable[[dict[str, Tensor]], T]) -> T | None:
        """A cache entry unpacked, or None when absent; an entry that does not hold the names
        and shapes this profile stores there (altered, or from another allot) is ignored with a
        warning, and recomputed. Under `torchrun` an entry counts only when every process found
        it, so that all of them compute (and all-reduce) the same things."""
        stored = self.cache.get(key)
        unpacked = None
        if stored is not None:
            try:
                unpacked = unpack(stored)
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                warnings.warn(
                    f"a profile cache entry ({key[:16]}) does not hold what allot stores there "
                    f"({exc}); recomputing it",
                    stacklevel=3,
                )
        return unpacked if distributed.agree(unpacked is not None) else None

    def _entry_key(self, kind: str, *settings: object) -> str:
        if self._key is None:
            fingerprint = Fingerprint().value(_VERSION).model(self.model)
            try:
                fingerprint.batches(self.data)
            except TypeError as exc:
                if self.cache.directory is not None:
                    warnings.warn(
                        f"profile not cached: {exc} in the calibration batches", stacklevel=3
                    )
                self.cache = Cache(None)
            self._key = fingerprint.value(self.names).hexdigest()
        return Fingerprint().value([self._key, kind, *settings]).hexdigest()


@dataclass(frozen=True)
class LayerProfile:
    """One layer's view of a `Profile`."""

    profile: Profile
    name: str

    def weight(self) -> Tensor:
        """The layer's (BatchNorm-folded) float weight, as profiled, detached."""
        return self.profile.model.get_submodule(self.name).weight.detach()

    def inputs(self) -> LayerStats:
        return self.profile.inputs(self.name)

    def gradient(self) -> Tensor:
        return self.profile.gradient(self.name)

    def hessian_estimate(self) -> Estimate:
        return self.profile.hessian_estimates()[self.name]

    def eigenpairs(self) -> RitzPairs:
        return self.profile.eigenpairs()[self.name]


def _pack_inputs(stats: dict[str, LayerStats]) -> dict[str, Tensor]:
    packed = {}
    for name, entry in stats.items():
        if entry.input_cov is not None:
            packed[f"{name}/cov"] = entry.input_cov
        packed[f"{name}/samples"] = torch.tensor([entry.samples])
    return packed


def _shaped(
    stored: dict[str, Tensor], shapes: dict[str, torch.Size], suffix: str
) -> dict[str, Tensor]:
    """`stored[name + suffix]` for every name, each of its expected shape; `ValueError` (or
    `KeyError`) otherwise."""
    result = {}
    for name, shape in shapes.items():
        tensor = stored[name + suffix]
        if tensor.shape != shape:
            raise ValueError(f"{name + suffix} has shape {tuple(tensor.shape)}, not {tuple(shape)}")
        result[name] = tensor
    return result


def _unpack_inputs(stored: dict[str, Tensor], fan_ins: dict[str, int]) -> dict[str, LayerStats]:
    samples = _shaped(stored, {name: torch.Size([1]) for name in fan_ins}, "/samples")
    covs = {name: stored.get(f"{name}/cov") for name in fan_ins}
    for name, n in fan_ins.items():
        if covs[name] is not None and covs[name].shape != (n, n):
            raise ValueError(f"{name}/cov has shape {tuple(covs[name].shape)}, not {(n, n)}")
    return {name: LayerStats(covs[name], int(samples[name])) for name in fan_ins}


def _pack_estimates(estimates: dict[str, Estimate]) -> dict[str, Tensor]:
    packed = {}
    for name, e in estimates.items():
        packed[f"{name}/scalars"] = torch.tensor(
            [e.trace, e.trace_stderr, e.probes, float(e.converged)], dtype=torch.float64
        )
        packed[f"{name}/diagonal"] = e.diagonal
        packed[f"{name}/diagonal_stderr"] = e.diagonal_stderr
    return packed


def _unpack_estimates(
    stored: dict[str, Tensor], shapes: dict[str, torch.Size]
) -> dict[str, Estimate]:
    scalars = _shaped(stored, {name: torch.Size([4]) for name in shapes}, "/scalars")
    diagonals = _shaped(stored, shapes, "/diagonal")
    stderrs = _shaped(stored, shapes, "/diagonal_stderr")
    estimates = {}
    for name in shapes:
        trace, stderr, probes, converged = scalars[name].tolist()
        estimates[name] = Estimate(
            trace=trace,
            trace_stderr=stderr,
            diagonal=diagonals[name],
            diagonal_stderr=stderrs[name],
            probes=int(probes),
            converged=bool(converged),
        )
    return estimates


def _pack_pairs(pairs: dict[str, RitzPairs]) -> dict[str, Tensor]:
    return {
        f"{name}/{field}": getattr(p, field)
        for name, p in pairs.items()
        for field in ("values", "vectors", "residuals")
    }


def _unpack_pairs(stored: dict[str, Tensor], shapes: dict[str, torch.Size]) -> dict[str, RitzPairs]:
    pairs = {}
    for name, shape in shapes.items():
        values, vectors, residuals = (
            stored[f"{name}/{f}"] for f in ("values", "vectors", "residuals")
        )
        r = values.shape[0] if values.dim() == 1 else -1
        if r < 1 or vectors.shape != (shape.numel(), r) or residuals.shape != (r,):
            raise ValueError(f"{name}: eigenpairs of shapes that do not fit its weight")
        pairs[name] = RitzPairs(values, vectors, residuals)
    return pairs

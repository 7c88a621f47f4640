"""Candidates: for every layer, every scheme on its grid, with its cost and predicted damage.

Each candidate is really fitted (the scheme compresses the layer's weight), so its damage is computed
from the actual perturbation dW = W_hat - W, and its cost is the scheme's exact storage in bits.

A method may screen its candidates before the error model scores them (`Method.screen`, a margin):
each fitted candidate's output error |dW x|^2 on the calibration inputs (the `output` model, free
once the input statistics exist) stands in for its damage, and a candidate another one of its layer
beats by more than the margin at no more storage is dropped unscored (`allocate.screened` says when
that changes no plan). For an error model that costs a pass over the data per candidate
(`measured`), this is most of the scoring time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from allot.allocate import Options, screened
from allot.discover import Layer, get_weight
from allot.errors import ErrorModel, get_error_model
from allot.exceptions import AllotError, ConfigError, ModelError
from allot.modules.base import CompressedLayer, dense_weight
from allot.profile.engine import Profile
from allot.progress import progress_bar
from allot.schemes import Grid, Scheme
from allot.schemes.base import compress_all

HELD_BYTES = 2**30
"""Most bytes of dense perturbations scoring holds for an error model that scores many layers in
one call (the exact-HVP models share each batch's forward and first backward among them): past
this, the layers fitted so far are scored and their perturbations freed, at one more gradient
sweep per such call (a few at 100M weights, against some 700 second backwards)."""


@dataclass(frozen=True)
class Candidate:
    """One (layer, scheme) option: storage in bits, predicted damage (error-model units), and the
    compressed module fitted while scoring it (so applying a plan does not fit it again)."""

    scheme: Scheme
    cost_bits: int
    damage: float
    module: nn.Module | None = field(default=None, compare=False, repr=False)


@dataclass
class CandidateTable:
    """All candidates of all layers, in layer order, scored by one error model."""

    layers: list[Layer]
    candidates: list[list[Candidate]]
    error_model: str
    screened_out: list[int] | None = None
    """Per layer, how many of its grid's candidates screening dropped unscored (None: no
    screening)."""

    def options(self) -> Options:
        """Cost/damage arrays for the allocators, with the schemes' families when any has one
        (0 for a scheme in every family)."""
        families = [np.array([c.scheme.family or 0 for c in row]) for row in self.candidates]
        return Options(
            [np.array([c.cost_bits for c in row], dtype=np.float64) for row in self.candidates],
            [np.array([c.damage for c in row], dtype=np.float64) for row in self.candidates],
            families if any(f.any() for f in families) else None,
        )

    def macs(self, positions: dict[str, float]) -> list[np.ndarray]:
        """Per layer, each candidate's multiply-accumulates as its module executes them (a
        factorized layer both factors, others the dense product; a float layer `out * fan_in`
        per position) over `positions[layer]` output positions."""
        result = []
        for layer, row in zip(self.layers, self.candidates, strict=True):
            position = torch.empty(1, layer.spec.out_features, device="meta")
            dense = layer.spec.out_features * layer.spec.fan_in
            per = [
                c.module.macs(position) if isinstance(c.module, CompressedLayer) else dense
                for c in row
            ]
            result.append(np.array(per, dtype=np.float64) * positions[layer.name])
        return result

    def restricted(self, grid: Grid) -> CandidateTable:
        """The candidates whose scheme `grid` offers their layer, as scored here: a sub-grid's
        table without fitting or scoring again (the same as scoring it, for error models whose
        damage depends on the candidate alone). `ConfigError` naming a layer left without any."""
        rows = []
        for layer, row in zip(self.layers, self.candidates, strict=True):
            offered = set(grid(layer))
            kept = [c for c in row if c.scheme in offered]
            if not kept:
                raise ConfigError(f"the grid offers none of layer {layer.name}'s candidates")
            rows.append(kept)
        return CandidateTable(self.layers, rows, self.error_model)

    def alternatives(self, choice: list[int]) -> dict[str, dict[str, dict | None]] | None:
        """Why each layer got its family: per layer, for every family (`Scheme.kinds`) on the
        grid other than keep, that family's least damaging candidate costing no more than the
        layer's chosen one ({"label", "cost_bits", "damage"}; None when the family has none that
        small). None when the grid offers fewer than two families."""
        kinds = {c.scheme.kinds for row in self.candidates for c in row} - {"keep"}
        if len(kinds) < 2:
            return None
        families = sorted(kinds)
        result: dict[str, dict[str, dict | None]] = {}
        for layer, row, chosen in zip(
            self.layers, self.candidates, self.chosen(choice), strict=True
        ):
            entry: dict[str, dict | None] = {}
            for family in families:
                fitting = [
                    c for c in row if c.scheme.kinds == family and c.cost_bits <= chosen.cost_bits
                ]
                best = min(fitting, key=lambda c: (c.damage, c.cost_bits), default=None)
                entry[family] = (
                    None
                    if best is None
                    else {
                        "label": best.scheme.label(),
                        "cost_bits": best.cost_bits,
                        "damage": best.damage,
                    }
                )
            result[layer.name] = entry
        return result

    def chosen(self, choice: list[int]) -> list[Candidate]:
        return [row[j] for row, j in zip(self.candidates, choice, strict=True)]

    def fitted(self, choice: list[int]) -> dict[str, nn.Module]:
        """The fitted modules of a choice, by layer name (layers scored without one are left out)."""
        return {
            layer.name: cand.module
            for layer, cand in zip(self.layers, self.chosen(choice), strict=True)
            if cand.module is not None
        }


def score_candidates(
    model: nn.Module,
    layers: list[Layer],
    grid: Grid,
    error_model: ErrorModel,
    profile: Profile,
    progress: bool = True,
    screen: float | None = None,
) -> CandidateTable:
    """Fit every grid scheme to every layer and predict its damage with `error_model`; with
    `screen` (a margin >= 1), candidates screened out by their output error are dropped first,
    unscored (module docstring).

    Perturbations go to the error model as few calls as `HELD_BYTES` allows (all in one below
    it), so curvature models share their passes; a `layerwise` error model scores each layer as
    soon as it is fitted instead. Either way a call's dense perturbations are freed once scored
    (a model's worth of them per candidate otherwise).
    Each candidate keeps its fitted module (compressed storage, far smaller than the dense
    perturbations held while scoring).
    """
    schemes = [_grid_of(grid, layer) for layer in layers]
    modules: dict[str, list[nn.Module]] = {}
    deltas: dict[str, list[Tensor]] = {}
    damages: dict[str, list[float]] = {}
    screened_out = None if screen is None else []
    held = 0
    for i, layer in enumerate(progress_bar(layers, "fitting candidates", progress)):
        with torch.no_grad():
            weight, bias = get_weight(model, layer.name)
            view = profile.layer(layer.name)
            fitted = compress_all(schemes[i], weight, bias, layer.spec, view)
            changes = [dense_weight(m) - weight for m in fitted]
        if screened_out is not None:
            kept = _screened(layer, schemes[i], changes, profile, screen)
            screened_out.append(len(schemes[i]) - len(kept))
            schemes[i], fitted, changes = (
                [v[j] for j in kept] for v in (schemes[i], fitted, changes)
            )
        modules[layer.name], deltas[layer.name] = fitted, changes
        held += sum(change.numel() * change.element_size() for change in changes)
        if error_model.layerwise or held >= HELD_BYTES:
            damages.update(error_model.damages(deltas, profile))
            deltas.clear()
            held = 0
    if deltas:
        damages.update(error_model.damages(deltas, profile))
    for layer, row in zip(layers, schemes, strict=True):
        _check_finite(model, layer, row, damages[layer.name])
    rows = [
        [
            Candidate(scheme, scheme.storage_bits(layer.spec), damage, module)
            for scheme, damage, module in zip(
                row, damages[layer.name], modules[layer.name], strict=True
            )
        ]
        for layer, row in zip(layers, schemes, strict=True)
    ]
    return CandidateTable(layers, rows, error_model.name, screened_out)


def _screened(
    layer: Layer, row: list[Scheme], changes: list[Tensor], profile: Profile, margin: float
) -> list[int]:
    """Indices of the layer's candidates `allocate.screened` keeps by their output errors."""
    errors = get_error_model("output").damages({layer.name: changes}, profile)[layer.name]
    costs = np.array([s.storage_bits(layer.spec) for s in row], dtype=np.float64)
    # |dW x|^2 >= 0, up to rounding
    return screened(costs, np.maximum(np.array(errors), 0.0), margin).tolist()


def _check_finite(
    model: nn.Module, layer: Layer, schemes: list[Scheme], damages: list[float]
) -> None:
    """`ModelError` naming the layer and candidates whose predicted damage is NaN or infinite
    (weights or inputs so large that float32 arithmetic overflows, say), instead of an
    allocator's error about a vector of NaNs."""
    bad = list(
        dict.fromkeys(
            s.label() for s, d in zip(schemes, damages, strict=True) if not math.isfinite(d)
        )
    )
    if bad:
        weight, _ = get_weight(model, layer.name)
        raise ModelError(
            f"layer {layer.name}: candidates {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} "
            "have a NaN or infinite predicted damage: its weights (largest |w| "
            f"{float(weight.abs().max()):.3g}) or its inputs are so large that float32 overflows "
            f"(past 3.4e38); check the weights, or keep the layer in float (--keep '{layer.name}')"
        )


def _grid_of(grid: Grid, layer: Layer) -> list[Scheme]:
    """The grid's schemes for a layer; `ConfigError` naming the layer when there are none or one
    cannot apply to it."""
    schemes = list(grid(layer))
    if not schemes:
        raise ConfigError(f"the method's grid offers no scheme for layer {layer.name}")
    for scheme in schemes:
        try:
            scheme.check(layer.spec)
        except AllotError as exc:
            raise ConfigError(f"layer {layer.name}: {exc}") from exc
    return schemes

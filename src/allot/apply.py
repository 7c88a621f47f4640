"""Apply a plan: replace each planned layer by the module that really stores its compressed form."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from allot.discover import discover, get_weight
from allot.fold import fold_batchnorm, fold_structure
from allot.plan import Plan

if TYPE_CHECKING:
    from allot.profile.engine import Profile


def apply(
    model: nn.Module,
    plan: Plan,
    profile: Profile | None = None,
    fitted: Mapping[str, nn.Module] | None = None,
) -> nn.Module:
    """Compress `model` in place according to `plan` (folding BatchNorm first where planned).

    `profile` is the folded model's calibration profile, for schemes that fit to data. `fitted`
    maps layer names to modules already fitted by the plan's scheme to this model's (folded)
    weights, as scoring leaves them (`CandidateTable.fitted`); a copy of each is used instead of
    fitting again. `PlanError` if the plan does not fit the model. Returns the same model object,
    in eval mode; each compressed module is on its float weight's device.
    """
    fold_batchnorm(model.eval(), plan.folded)
    plan.check_fits(discover(model))
    fitted = fitted or {}
    for layer in plan.layers:
        if layer.name in fitted:
            model.set_submodule(layer.name, copy.deepcopy(fitted[layer.name]))
            continue
        weight, bias = get_weight(model, layer.name)
        view = profile.layer(layer.name) if profile is not None else None
        module = layer.scheme.compress(weight, bias, layer.spec, view)
        model.set_submodule(layer.name, module.to(weight.device))
    return model


def apply_structure(model: nn.Module, plan: Plan) -> nn.Module:
    """The compressed model's structure with uninitialised storage, ready to load an artifact."""
    fold_structure(model.eval(), plan.folded)
    plan.check_fits(discover(model))
    for layer in plan.layers:
        model.set_submodule(layer.name, layer.scheme.empty(layer.spec))
    return model.eval()

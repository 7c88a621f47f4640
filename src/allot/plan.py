"""The plan: layer -> scheme, with predicted cost and damage. Versioned JSON, editable by hand.

The plan is the contract between deciding (profile, candidates, allocate) and doing (apply, refine,
evaluate). A layer's cost is derived from its scheme and geometry, never trusted from the file, so a
hand edit of a scheme is always costed correctly; its damage is the prediction made when the plan was
built (null when unknown).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from allot.budget import Budget
from allot.discover import Discovery, LayerSpec
from allot.exceptions import AllotError, PlanError, shown
from allot.schemes import Scheme, scheme_from_json

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """One layer's decision: its name, geometry, scheme, and predicted damage (error-model units)."""

    name: str
    spec: LayerSpec
    scheme: Scheme
    damage: float | None = None

    @property
    def cost_bits(self) -> int:
        """Storage of the compressed weight in bits (scales, indices, factors included)."""
        return self.scheme.storage_bits(self.spec)

    @property
    def float_bits(self) -> int:
        return 32 * self.spec.numel

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scheme": self.scheme.to_json(),
            "label": self.scheme.label(),
            "cost_bits": self.cost_bits,
            "bits_per_weight": round(self.cost_bits / self.spec.numel, 4),
            "damage": self.damage,
            "spec": self.spec.to_json(),
        }


@dataclass
class Plan:
    """A whole model's plan.

    `model`: zoo name, or a description of a user model; `folded`: (conv, batchnorm) pairs folded
    before compression; `skipped`: layers kept in float and why; `metadata`: how the plan was made
    (seed, calibration size, allocator, timings, versions).
    """

    model: str
    method: str
    error_model: str
    budget: Budget
    layers: list[LayerPlan]
    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def weight_bits(self) -> int:
        """Storage of all compressed weights, in bits."""
        return sum(layer.cost_bits for layer in self.layers)

    @property
    def float_weight_bits(self) -> int:
        """float32 size of the same weights, in bits."""
        return sum(layer.float_bits for layer in self.layers)

    @property
    def n_weights(self) -> int:
        return sum(layer.spec.numel for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Compression ratio of the compressible weights: float32 bits / compressed bits."""
        return self.float_weight_bits / self.weight_bits

    @property
    def damage(self) -> float | None:
        """Summed predicted damage (None if any layer has none)."""
        values = [layer.damage for layer in self.layers]
        return None if any(v is None for v in values) else float(sum(values))

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise PlanError(f"the plan has no layer {shown(name)}")

    def check_fits(self, discovery: Discovery) -> None:
        """`PlanError` unless the plan's layers are exactly the model's compressible layers."""
        found = {layer.name: layer.spec for layer in discovery.layers}
        planned = {layer.name: layer.spec for layer in self.layers}
        missing = sorted(set(planned) - set(found))
        if missing:
            raise PlanError(
                f"the plan names layers the model does not have: "
                f"{', '.join(shown(name) for name in missing[:5])}; "
                "is it a plan for another model?"
            )
        for name, spec in planned.items():
            if found[name] != spec:
                raise PlanError(
                    f"layer {shown(name)}: the plan's geometry differs from the model's "
                    f"({'; '.join(spec.differences(found[name]))}, plan vs model); "
                    "is it a plan for another model?"
                )
        extra = sorted(set(found) - set(planned))
        if extra:
            raise PlanError(
                f"the model has layers the plan does not cover: {', '.join(extra[:5])}; "
                "add them (scheme 'keep' leaves a layer in float)"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model,
            "method": self.method,
            "error_model": self.error_model,
            "budget": self.budget.to_json(),
            "summary": {
                "ratio": round(self.ratio, 4),
                "weight_bits": self.weight_bits,
                "float_weight_bits": self.float_weight_bits,
                "bits_per_weight": round(self.weight_bits / self.n_weights, 4),
                "predicted_damage": self.damage,
            },
            "folded": [list(pair) for pair in self.folded],
            "skipped": self.skipped,
            "layers": [layer.to_json() for layer in self.layers],
            "metadata": self.metadata,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        """Validate and rebuild a plan; `PlanError` names the first bad field."""
        if not isinstance(data, dict):
            raise PlanError(f"plan: expected a JSON object, got {type(data).__name__}")
        version = _field(data, "version", int, "plan")
        if version != PLAN_VERSION:
            raise PlanError(f"plan.version: this allot reads version {PLAN_VERSION}, got {version}")
        try:
            budget = Budget.from_json(_field(data, "budget", dict, "plan"))
        except AllotError as exc:
            raise PlanError(f"plan.budget: {exc}") from exc
        layers_data = _field(data, "layers", list, "plan")
        layers = []
        for i, item in enumerate(layers_data):
            where = f"plan.layers[{i}]"
            if not isinstance(item, dict):
                raise PlanError(f"{where}: expected an object, got {item!r:.60}")
            damage = _damage(item.get("damage"), where)
            try:
                spec = LayerSpec.from_json(_field(item, "spec", dict, where))
            except PlanError as exc:
                raise PlanError(f"{where}.spec: {exc}") from exc
            scheme = scheme_from_json(_field(item, "scheme", dict, where), f"{where}.scheme")
            try:
                scheme.check(spec)
            except AllotError as exc:
                raise PlanError(f"{where}.scheme: {exc}") from exc
            layers.append(LayerPlan(_field(item, "name", str, where), spec, scheme, damage))
        if not layers:
            raise PlanError("plan.layers: empty; a plan covers at least one layer")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise PlanError("plan.layers: a layer name appears twice")
        folded = _field(data, "folded", list, "plan")
        if not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
            for p in folded
        ):
            raise PlanError("plan.folded: expected a list of [conv, batchnorm] name pairs")
        return cls(
            model=_field(data, "model", str, "plan"),
            method=_field(data, "method", str, "plan"),
            error_model=_field(data, "error_model", str, "plan"),
            budget=budget,
            layers=layers,
            folded=[(a, b) for a, b in folded],
            skipped=_field(data, "skipped", dict, "plan"),
            metadata=_field(data, "metadata", dict, "plan"),
            version=version,
        )

    @classmethod
    def loads(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan: not valid JSON ({exc})") from exc
        return cls.from_json(data)


def _damage(value: Any, where: str) -> float | None:
    """A layer's predicted damage from JSON: null, or a finite number (as float)."""
    if value is None:
        return None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if math.isfinite(value):
                return value
    except OverflowError:
        pass
    raise PlanError(f"{where}.damage: expected a finite number or null, got {value!r:.40}")


def _field(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise PlanError(f"{where}.{key}: missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PlanError(f"{where}.{key}: expected {kind.__name__}, got {value!r:.60}")
    return value


def compressed_layers(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """The modules that replaced each planned layer in a compressed model."""
    return {layer.name: model.get_submodule(layer.name) for layer in plan.layers}

"""Refine: improve an applied plan's compressed layers without changing what they store.

A `Refiner` runs `run(reference, model, plan, data, settings, progress) -> model`: `reference` is
the float (BatchNorm-folded) model, `model` the plan applied to a copy of it, refined in place.
Each refiner names the dataclass of its settings; `configure` builds it from plain values (a
method's defaults, then the caller's overrides such as `--refine-epochs`), refusing unknown or
invalid ones with a `ConfigError` that names them.

Registered: `feedback` (error feedback: re-fit each re-fittable layer on the compressed model's
inputs, no settings), `finetune` (a short training of the compressed model's trainable
parameters on the data's training batches, `TrainSettings`), `lowrank-joint` (error feedback, then the
joint step of lossless low-rank factorization on every factorized layer, `JointSettings`) and
`lc` (learning-compression: train the float weights towards the plan's compressed form,
`LCSettings`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from allot.data import Data
from allot.exceptions import AllotError, ConfigError
from allot.plan import Plan
from allot.refine.feedback import feedback
from allot.refine.finetune import finetune
from allot.refine.joint import JointSettings, joint
from allot.refine.lc import LCSettings, learning_compression
from allot.refine.train import TrainSettings
from allot.registry import Registry


@dataclass(frozen=True)
class NoSettings:
    """The settings of a refiner that takes none."""


@dataclass(frozen=True)
class Refiner:
    """A named refinement: `run(reference, model, plan, data, settings, progress)` and the
    dataclass type of its `settings`."""

    name: str
    run: Callable[[nn.Module, nn.Module, Plan, Data, Any, bool], nn.Module]
    settings: type = NoSettings
    description: str = ""

    def configure(self, values: Mapping[str, Any] | None = None) -> Any:
        """This refiner's settings from plain values; `ConfigError` naming unknown or invalid
        ones."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(self.settings)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"refinement {self.name!r} has no setting {', '.join(map(repr, unknown))}; "
                f"its settings: {', '.join(sorted(known)) or 'none'}"
            )
        try:
            return self.settings(**values)
        except (AllotError, TypeError, ValueError) as exc:
            raise ConfigError(f"refinement {self.name!r}: {exc}") from exc


REFINERS: Registry[Refiner] = Registry("refinement")


def register_refiner(refiner: Refiner) -> Refiner:
    """Register a refinement under its name (methods name it in `Method.refine`)."""
    return REFINERS.add(refiner.name, refiner)


def get_refiner(name: str) -> Refiner:
    """The refinement `name`; ConfigError listing the known ones otherwise."""
    return REFINERS[name]


register_refiner(
    Refiner(
        "feedback",
        lambda reference, model, plan, data, _settings, progress: feedback(
            reference, model, plan, data, progress
        ),
        description="re-fit each re-fittable layer in order on the compressed model's inputs",
    )
)
register_refiner(
    Refiner(
        "finetune",
        finetune,
        TrainSettings,
        "train the compressed model's trainable parameters on the training batches",
    )
)
register_refiner(
    Refiner(
        "lowrank-joint",
        joint,
        JointSettings,
        "re-fit each factorized layer in order, then move its factors to lower its output error "
        "plus the second-order loss change",
    )
)
register_refiner(
    Refiner(
        "lc",
        learning_compression,
        LCSettings,
        "learning-compression: train the float weights towards the plan's compressed form",
    )
)

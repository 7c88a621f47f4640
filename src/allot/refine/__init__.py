"""Refine: improve an applied plan's compressed layers without changing what they store.

A refiner is `refine(reference, model, plan, data, progress) -> model`: `reference` is the float
(BatchNorm-folded) model, `model` the plan applied to a copy of it, refined in place.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from allot.data import Data
from allot.plan import Plan
from allot.refine.feedback import feedback
from allot.registry import Registry

Refiner = Callable[[nn.Module, nn.Module, Plan, Data, bool], nn.Module]
REFINERS: Registry[Refiner] = Registry("refinement")
REFINERS.add("feedback", feedback)


def register_refiner(name: str, refiner: Refiner) -> Refiner:
    """Register a refinement under `name` (methods name it in `Method.refine`)."""
    return REFINERS.add(name, refiner)


def get_refiner(name: str) -> Refiner:
    """The refinement `name`; ConfigError listing the known ones otherwise."""
    return REFINERS[name]

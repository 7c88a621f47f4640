"""Refine: improve an applied plan's compressed layers without changing what they store."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from allot.exceptions import ConfigError
from allot.plan import Plan
from allot.refine.feedback import feedback
from allot.zoo.data import Dataset

Refiner = Callable[[nn.Module, nn.Module, Plan, Dataset, bool], nn.Module]
REFINERS: dict[str, Refiner] = {"feedback": feedback}


def get_refiner(name: str) -> Refiner:
    """The refinement `name`; ConfigError listing the known ones otherwise."""
    if name not in REFINERS:
        raise ConfigError(f"unknown refinement {name!r}; known: {', '.join(sorted(REFINERS))}")
    return REFINERS[name]

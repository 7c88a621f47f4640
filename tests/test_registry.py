"""One registry helper behind every name allot looks up, with one message shape."""

from __future__ import annotations

import pytest

from allot.allocate import ALLOCATORS
from allot.errors import ERROR_MODELS
from allot.exceptions import ConfigError, DataError, ModelError
from allot.methods import METHODS
from allot.refine import REFINERS
from allot.registry import Registry
from allot.schemes import SCHEMES
from allot.zoo import DATASETS, MODELS


def test_lookups_add_and_duplicates() -> None:
    registry: Registry[int] = Registry("widget")
    registry.add("b", 2)
    assert registry.register("a")(1) == 1
    assert registry["a"] == 1 and "a" in registry and len(registry) == 2
    assert list(registry) == ["b", "a"] and registry.names() == ["a", "b"]
    assert registry.get("zzz") is None
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("a", 3)
    with pytest.raises(ConfigError, match=r"^unknown widget 'c'; known: a, b$"):
        registry["c"]


@pytest.mark.parametrize(
    ("registry", "error", "kind"),
    [
        (SCHEMES, ConfigError, "scheme"),
        (METHODS, ConfigError, "method"),
        (ERROR_MODELS, ConfigError, "error model"),
        (ALLOCATORS, ConfigError, "allocator"),
        (REFINERS, ConfigError, "refinement"),
        (MODELS, ModelError, "zoo model"),
        (DATASETS, DataError, "data set"),
    ],
)
def test_every_registry_uses_the_helper_and_names_the_known_entries(registry, error, kind) -> None:
    assert isinstance(registry, Registry) and len(registry) > 0
    with pytest.raises(error, match=f"unknown {kind} 'nope'; known: {registry.names()[0]}"):
        registry["nope"]

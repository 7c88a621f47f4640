"""Per-layer policy: the layers a user keeps in float or pins to a scheme, by name pattern.

A rule is a shell-style glob over layers' qualified names (`fc`, `layer3.*`, `*.attention.*`) and
the scheme every matching layer must take (`Keep` for "leave it in float"). Rules apply in the
order given; a later rule overrides an earlier one for the layers both match, so a broad rule can
be refined by a narrower one after it. A matched layer's only candidate is its rule's scheme, and
the allocator works around it within the same budget; every other layer gets the method's grid.

A rule that matches no layer is an error, not a no-op: a typo in `--keep` would otherwise compress
exactly the layer the user meant to protect.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from allot.discover import Layer
from allot.exceptions import AllotError, ConfigError
from allot.schemes import Grid, Keep, Scheme, parse_scheme


@dataclass(frozen=True)
class Rule:
    """Layers whose name matches `pattern` (a glob) take `scheme`."""

    pattern: str
    scheme: Scheme

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def to_json(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "scheme": self.scheme.to_json()}


@dataclass(frozen=True)
class Policy:
    """An ordered list of rules; the empty policy leaves every layer to the method."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def parse(cls, keep: Sequence[str] = (), pins: Sequence[str] = ()) -> Policy:
        """From `--keep PATTERN` values, then `--pin PATTERN=SCHEME` values (`fc=quant:8`)."""
        rules = [Rule(pattern, Keep()) for pattern in keep]
        for text in pins:
            pattern, sep, scheme = text.partition("=")
            if not sep or not pattern or not scheme:
                raise ConfigError(f"--pin {text!r}: expected PATTERN=SCHEME, e.g. 'fc=quant:8'")
            rules.append(Rule(pattern, parse_scheme(scheme)))
        return cls(tuple(rules))

    def scheme_for(self, name: str) -> Scheme | None:
        """The scheme the last rule matching `name` pins, or None when no rule matches."""
        for rule in reversed(self.rules):
            if rule.matches(name):
                return rule.scheme
        return None

    def check(self, layers: Sequence[Layer]) -> None:
        """`ConfigError` when a rule matches no layer or its scheme cannot apply to a layer it
        matches."""
        for rule in self.rules:
            matched = [layer for layer in layers if rule.matches(layer.name)]
            if not matched:
                names = ", ".join(layer.name for layer in layers[:8])
                more = ", ..." if len(layers) > 8 else ""
                raise ConfigError(
                    f"the pattern {rule.pattern!r} matches no compressible layer; the layers "
                    f"are: {names}{more}"
                )
            for layer in matched:
                try:
                    rule.scheme.check(layer.spec)
                except AllotError as exc:
                    raise ConfigError(
                        f"{rule.scheme.label()} cannot apply to layer {layer.name}: {exc}"
                    ) from exc

    def grid(self, grid: Grid) -> Grid:
        """`grid` with every ruled layer restricted to its rule's scheme."""
        if not self.rules:
            return grid

        def ruled(layer: Layer) -> list[Scheme]:
            scheme = self.scheme_for(layer.name)
            return [scheme] if scheme is not None else grid(layer)

        return ruled

    def to_json(self) -> list[dict[str, Any]]:
        return [rule.to_json() for rule in self.rules]

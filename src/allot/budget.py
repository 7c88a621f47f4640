"""Budgets: what the user fixes, and its translation into a limit on compressed weight bits.

Units: the compressible weights' float size is 32 bits per weight. A *ratio* R means the compressed
weights (codes, scales, offsets, indices, factors: everything stored for them) take at most
1/R of their float32 size. *avg_bits* A is the same limit written as bits per weight (ratio = 32/A).
*bytes* N limits the whole parameter payload: compressed weights plus every other float32 tensor
(biases, normalisation parameters, embeddings). *bits* B means "the size of B-bit quantization of
every layer" (per-channel scales included). *damage* D asks for the smallest plan whose predicted
damage (the method's error-model units; nats of calibration loss for the second-order model) is at
most D, the complement of a size budget. *lossless* asks for the smallest plan whose measured
calibration loss is not above the float model's; *loss* L for the smallest plan whose measured
calibration loss is at most the float model's plus L (loss units: a lossless budget with a
tolerance, for losses the float model cannot be beaten on, such as a distance to its own outputs).

A size budget may also limit compute: `macs_ratio` M asks that the compressible layers execute at
most 1/M of their float multiply-accumulates (on one calibration sample, as the plan's report counts
them: a factorized layer counts both factors, a quantized or sparse one its dense product).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from allot.exceptions import BudgetError

KINDS = ("ratio", "avg_bits", "bytes", "bits", "damage", "lossless", "loss")


@dataclass(frozen=True)
class Budget:
    """A budget of one kind (see module docstring); `value` is None only for `lossless`."""

    kind: str
    value: float | None = None
    macs_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BudgetError(
                f"unknown budget kind {self.kind!r:.40}; use one of {', '.join(KINDS)}"
            )
        if self.macs_ratio is not None:
            ratio = self.macs_ratio
            if (
                isinstance(ratio, bool)
                or not isinstance(ratio, (int, float))
                or not 1 <= ratio < math.inf
            ):
                raise BudgetError(f"a MACs ratio must be a finite number >= 1, got {ratio!r:.40}")
            if not self.is_size:
                raise BudgetError(
                    f"a MACs ratio limits compute beside a size budget, not a {self.kind} budget; "
                    "give it with --ratio, --avg-bits, --bytes or --bits"
                )
        if self.kind == "lossless":
            if self.value is not None:
                raise BudgetError("a lossless budget takes no value")
            return
        number = isinstance(self.value, (int, float)) and not isinstance(self.value, bool)
        finite = number and math.isfinite(self.value)
        if self.kind == "damage":
            if not finite:
                raise BudgetError(f"a damage limit must be a finite number, got {self.value!r:.40}")
            return
        if self.kind == "loss":
            if not finite or self.value < 0:
                raise BudgetError(
                    f"a loss tolerance must be a finite number >= 0, got {self.value!r:.40}"
                )
            return
        if not finite or not self.value > 0:
            raise BudgetError(
                f"budget {self.kind} must be a positive finite number, got {self.value!r:.40}"
            )
        if self.kind == "ratio" and self.value < 1:
            raise BudgetError(f"a compression ratio must be >= 1, got {self.value}")
        if self.kind in ("avg_bits", "bits") and self.value > 32:
            raise BudgetError(f"{self.kind} must be at most 32 (float32), got {self.value}")
        if self.kind == "bits" and self.value != int(self.value):
            raise BudgetError(f"--bits must be a whole bit-width, got {self.value}")

    @property
    def is_size(self) -> bool:
        """Whether the budget limits size (the others limit damage)."""
        return self.kind not in ("damage", "lossless", "loss")

    @property
    def measured(self) -> bool:
        """Whether the budget limits the measured calibration loss (`lossless`, `loss`)."""
        return self.kind in ("lossless", "loss")

    @property
    def tolerance(self) -> float:
        """How far a measured budget lets the calibration loss rise above the float model's."""
        return float(self.value) if self.kind == "loss" else 0.0

    def describe(self) -> str:
        labels = {
            "ratio": "ratio {}x",
            "avg_bits": "{} bits/weight",
            "bytes": "{} bytes",
            "bits": "{}-bit size",
            "damage": "predicted damage <= {}",
            "loss": "calibration loss <= float + {}",
        }
        text = "lossless" if self.kind == "lossless" else labels[self.kind].format(self.value)
        return text if self.macs_ratio is None else f"{text}, MACs / {self.macs_ratio}"

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.macs_ratio is None else {"macs_ratio": self.macs_ratio}
        return {"kind": self.kind, "value": self.value, **extra}

    @classmethod
    def from_json(cls, data: Any) -> Budget:
        if not isinstance(data, dict) or not {"kind", "value"} <= set(data) <= {
            "kind",
            "value",
            "macs_ratio",
        }:
            raise BudgetError(
                f"budget must be an object with 'kind', 'value' (and 'macs_ratio'), got {data!r:.80}"
            )
        return cls(data["kind"], data["value"], data.get("macs_ratio"))


def weight_bits_limit(
    budget: Budget, n_weights: int, other_bits: int, bits_cost: int | None
) -> float:
    """The most bits the compressible weights may take under `budget`.

    `n_weights`: number of compressible weights; `other_bits`: float32 bits of everything else the
    artifact stores; `bits_cost`: storage of B-bit quantization of every layer (for kind `bits`).
    """
    if budget.kind == "ratio":
        return 32 * n_weights / budget.value
    if budget.kind == "avg_bits":
        return budget.value * n_weights
    if budget.kind == "bits":
        if bits_cost is None:
            raise BudgetError("--bits needs the cost of quantizing every layer at that width")
        return float(bits_cost)
    if budget.kind == "bytes":
        limit = budget.value * 8 - other_bits
        if limit <= 0:
            raise BudgetError(
                f"--bytes {budget.value:.0f} is below the {other_bits // 8} bytes of parameters that "
                "stay float (biases, normalisation, embeddings); raise the budget"
            )
        return limit
    raise BudgetError(f"a {budget.kind} budget has no size limit")


def describe_bits(kind: str, bits: float, n_weights: int, other_bits: int) -> str:
    """Express a weight-bit amount in the unit of a budget kind, for error messages."""
    if kind == "ratio":
        return f"ratio {32 * n_weights / bits:.3g}x"
    if kind == "avg_bits":
        return f"{bits / n_weights:.3g} bits/weight"
    if kind == "bytes":
        return f"{(bits + other_bits) / 8:.0f} bytes"
    return f"{bits:.0f} bits"

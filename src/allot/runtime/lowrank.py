"""A low-rank layer run in whichever form is faster on this machine: its two factors, or the
dense product of them computed once.

A low-rank layer stores U (out, r) and V (r, fan_in) and runs them as two operations: V as the
layer's own operation into r channels, then U pointwise. That is fewer multiply-accumulates than
the dense layer whenever r (out + fan_in) < out fan_in, but not always less time. On CPU a
convolution computes its output channels in blocks of the vector width (16 float32 on AVX-512),
so a first factor of rank 17 takes as long as one of rank 32; the r intermediate channels are
written and read again; and the pointwise product on few channels runs at a fraction of the
convolution's speed (measured per layer of ResNet-20 in
bench/results/mnist-resnet20-lowrank-latency.md). Where the two operations are slower, the dense
product U V, computed once from the stored factors and kept (a cached weight: float memory for
that layer), runs the float operation instead.

`FasterForm` chooses per input shape, on the first inference call with that shape: both forms
run on that very input in `ROUNDS` interleaved rounds after `WARMUP` calls each, and the dense
product is chosen only when its fastest call beat the factors' fastest (`faster`; a tie keeps the
factors). The minimum, not the median: other work on the machine only ever adds time to a call,
so the fastest call is the closest to what the form costs. The dense weight is kept only while some input shape runs it. Nothing stored changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from torch import Tensor

from allot.modules.base import CompressedLayer
from allot.modules.lowrank import Bottleneck
from allot.runtime.runner import Runner

FACTORS = "factors"
DENSE = "dense product"
UNDECIDED = "factors or dense product (timed on first call)"
WARMUP = 2
ROUNDS = 7


def faster(factors: Sequence[float], dense: Sequence[float]) -> str:
    """The form to run, given seconds of interleaved calls of each: `DENSE` only when its fastest
    call is strictly faster than the factors' fastest, else `FACTORS` (the smaller form)."""
    return DENSE if min(dense) < min(factors) else FACTORS


class FasterForm(Runner):
    """Runs a low-rank layer (`Bottleneck`: float or quantized factors) as its factors or as the dense product of them, whichever the first
    call with each input shape measured faster. `clock` (seconds) is what the timing reads.

    `forms` maps each input shape seen to the form chosen, `seconds` to the fastest call's seconds
    of the factors and of the dense product measured for it; `ran_dense` says what the last call ran."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.clock = clock
        self.forms: dict[tuple[int, ...], str] = {}
        self.seconds: dict[tuple[int, ...], tuple[float, float]] = {}
        self.weight: Tensor | None = None
        self.ran_dense = False

    @property
    def label(self) -> str:  # type: ignore[override]
        chosen = sorted(set(self.forms.values()))
        return " / ".join(chosen) if chosen else UNDECIDED

    def prepare(self, layer: CompressedLayer) -> None:
        self.forms, self.seconds, self.weight = {}, {}, None

    def run(self, layer: CompressedLayer, x: Tensor) -> Tensor:
        assert isinstance(layer, Bottleneck)
        shape = tuple(x.shape)
        if shape not in self.forms:
            self.forms[shape] = self._choose(layer, x)
            if DENSE not in self.forms.values():
                self.weight = None
        self.ran_dense = self.forms[shape] == DENSE
        return self._dense(layer, x) if self.ran_dense else layer.factored(x)

    def _dense(self, layer: Bottleneck, x: Tensor) -> Tensor:
        if self.weight is None:
            self.weight = layer.reconstruct().detach().contiguous()
        return layer.spec.forward(x, self.weight, layer.bias)

    def _choose(self, layer: Bottleneck, x: Tensor) -> str:
        """Time both forms on `x` in interleaved rounds; record the fastest calls, return the
        faster form."""
        forms: dict[str, Callable[[], Tensor]] = {
            FACTORS: lambda: layer.factored(x),
            DENSE: lambda: self._dense(layer, x),
        }
        for run in forms.values():
            for _ in range(WARMUP):
                run()
        seconds: dict[str, list[float]] = {form: [] for form in forms}
        for _ in range(ROUNDS):
            for form, run in forms.items():
                start = self.clock()
                run()
                seconds[form].append(self.clock() - start)
        self.seconds[tuple(x.shape)] = (min(seconds[FACTORS]), min(seconds[DENSE]))
        return faster(seconds[FACTORS], seconds[DENSE])

"""Gradient and Hessian-vector products of the calibration loss, by double backprop.

The calibration loss is the sample-weighted mean of the per-batch mean losses,
L = sum_b n_b L_b / N, with n_b the number of samples of batch b (`Data.size`) and N = sum_b n_b,
over the calibration batches of the data contract (`allot.data`), streamed once per sweep. The parameters are the `.weight` tensors of the named layers; biases and every other
parameter are held fixed. Hessian-vector products use Pearlmutter's trick, H v = d/dw (g(w) . v):
per batch one forward, one backward that records its own graph, and one second backward per vector.

Every quantity is accumulated as a sum over batches of n_b times the per-batch quantity and divided
by N only at the end; under `torchrun` each process sums its share of the batches and the sums and
N are all-reduced before that division (`allot.distributed`), so every process gets the same result.

The model runs in eval mode, in its own dtype and on its own device (batches must already be there).
Its training flags and `requires_grad` flags are restored after every call, and no `.grad` is left
behind. Results assume the weights do not change while a `Curvature` is in use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from allot import distributed
from allot.data import Data
from allot.exceptions import ConfigError, DataError
from allot.profile.convolution import split_convolutions


@dataclass
class Passes:
    """Work spent so far, in sweeps over the calibration set (one sweep = every batch once).

    `gradient_sweeps` counts forward+backward sweeps (with or without a recorded graph);
    `second_backward_sweeps` counts backward sweeps through a gradient's graph, one per HVP vector.
    """

    gradient_sweeps: int = 0
    second_backward_sweeps: int = 0

    @property
    def fb_equivalents(self) -> int:
        """Nominal work in forward+backward equivalents over the calibration set.

        A gradient sweep counts 1 and each second backward 1 more, so one HVP counts 2 and m HVPs
        of one layer sharing a graph (`layer_hvps`) count 1 + m. This is a model, not a timing:
        on CPU a full-model HVP took about 2.7 forward+backward times, and a second backward from
        0.1 (last layer: the graph stops there) to 1.5 (first layer) of one.
        """
        return self.gradient_sweeps + self.second_backward_sweeps


class Curvature:
    """Gradient and Hessian-vector products of a model's calibration loss w.r.t. layer weights.

    `layers` are qualified module names whose `.weight` are the parameters; `data` gives the
    calibration batches and the loss (`allot.data.Data`). Vectors and
    results have the weights' shapes; results are in the model's dtype, in loss units per squared
    weight unit (H v) or loss units per weight unit (g). `passes` counts the work spent;
    `on_step()` is called after each batch's second backward of each vector (for progress bars).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], data: Data) -> None:
        if not layers:
            raise ConfigError("no layers given; name at least one layer whose weight to profile")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"layer names repeat: {list(layers)}")
        modules = dict(model.named_modules())
        self._weights: dict[str, nn.Parameter] = {}
        for name in layers:
            weight = getattr(modules.get(name), "weight", None)
            if not isinstance(weight, nn.Parameter):
                raise ConfigError(f"{name!r} is not a module of the model with a .weight parameter")
            if any(weight is other for other in self._weights.values()):
                raise ConfigError(
                    f"the weight of {name!r} is tied to another listed layer; list only one"
                )
            self._weights[name] = weight
        self.model = model
        self.layers = list(layers)
        self.data = data
        self.passes = Passes()
        self.on_step: Callable[[], None] = lambda: None
        self._gradient: dict[str, Tensor] | None = None

    def shape(self, name: str) -> torch.Size:
        """Shape of a layer's weight."""
        return self._weight(name).shape

    def gradient(self) -> dict[str, Tensor]:
        """g_i = dL/dw_i for every layer (computed once, one gradient sweep, then cached)."""
        if self._gradient is None:
            sums = [torch.zeros_like(self._weights[name]) for name in self.layers]
            samples = 0
            with self._differentiating(self.layers) as weights:
                for n, grads in self._batch_gradients(weights, create_graph=False):
                    samples += n
                    for total, grad in zip(sums, grads, strict=True):
                        total.add_(grad, alpha=n)
            (samples,) = distributed.sum_over_ranks(sums, [samples])
            self.passes.gradient_sweeps += 1
            self._gradient = {
                name: s / _checked(samples) for name, s in zip(self.layers, sums, strict=True)
            }
        return dict(self._gradient)

    def hvp(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """(H v)_i = sum_j H_ij v_j for every layer i, cross-layer blocks included.

        Layers absent from `vectors` count as zero vectors. Costs 2 forward+backward equivalents.
        """
        return self.hvps([vectors])[0]

    def hvps(self, vectors: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """`hvp` of each of several vectors, sharing each batch's forward and first backward:
        one gradient sweep plus one second backward per vector (1 + len(vectors) forward+backward
        equivalents instead of 2 len(vectors))."""
        for vs in vectors:
            for name in vs:
                self._weight(name)
        return self._hvps(self.layers, [(vs, self.layers) for vs in vectors])

    def layer_hvp(self, name: str, v: Tensor) -> Tensor:
        """H_ii v: one layer's Hessian block times v (2 forward+backward equivalents)."""
        return self.layer_hvps(name, [v])[0]

    def layer_hvps(self, name: str, vs: Sequence[Tensor]) -> list[Tensor]:
        """H_ii v for several vectors of one layer, sharing each batch's forward and backward.

        Costs 1 + len(vs) forward+backward equivalents instead of 2 len(vs) for separate calls.
        """
        return self.block_hvps({name: list(vs)})[name]

    def block_hvps(self, vectors: dict[str, Sequence[Tensor]]) -> dict[str, list[Tensor]]:
        """H_ii v for every listed layer i and each of its vectors: the block-diagonal products.

        All layers share each batch's forward and first backward, so this costs one gradient sweep
        plus one second backward per vector (a layer's second backward runs from the loss down to
        that layer only, so it is cheap for late layers and about a full backward for early ones).
        """
        for name in vectors:
            self._weight(name)
        names = [name for name in self.layers if vectors.get(name)]
        requests = [({name: v}, [name]) for name in names for v in vectors[name]]
        products = iter(self._hvps(names, requests)) if requests else iter(())
        return {
            name: [next(products)[name] for _ in vectors[name]] if name in names else []
            for name in vectors
        }

    def _weight(self, name: str) -> nn.Parameter:
        if name not in self._weights:
            raise ConfigError(
                f"layer {name!r} is not profiled here; the profiled layers are {self.layers}"
            )
        return self._weights[name]

    def block_quadratics(self, vectors: dict[str, Sequence[Tensor]]) -> dict[str, list[float]]:
        """v'H_ii v for every listed layer i and each of its vectors (loss units per squared
        weight unit times the vector's squared units), in float64.

        The same passes as `block_hvps`, but each product is reduced to its quadratic form batch
        by batch, so no weight-sized product is held per vector: scoring many candidates at once
        holds their perturbations only."""
        for name in vectors:
            self._weight(name)
        names = [name for name in self.layers if vectors.get(name)]
        requests = [({name: v}, [name]) for name in names for v in vectors[name]]
        device = self._weights[names[0]].device if names else None
        totals = torch.zeros(len(requests), dtype=torch.float64, device=device)

        def reduce(k: int, n_b: int, request: dict[str, Tensor], hvs: list[Tensor]) -> None:
            (name,) = request
            totals[k] += n_b * (hvs[0].double() * request[name].double()).sum()

        samples = self._second_backwards(names, requests, reduce, [totals]) if requests else 1
        values = iter((totals / _checked(samples)).tolist())
        return {
            name: [next(values) for _ in vectors[name]] if name in names else [] for name in vectors
        }

    def _hvps(
        self, names: list[str], requests: list[tuple[dict[str, Tensor], list[str]]]
    ) -> list[dict[str, Tensor]]:
        """For each request (vectors {layer: v}, output layers), sum_j H_ij v_j for every output
        layer i, all layers within `names` (vectors of other layers count as zero). One forward and
        first backward per batch serve every request; each request costs one second backward."""
        sums = [{n: torch.zeros_like(self._weights[n]) for n in outputs} for _, outputs in requests]

        def accumulate(k: int, n_b: int, request: dict[str, Tensor], hvs: list[Tensor]) -> None:
            for entry, hv in zip(sums[k].values(), hvs, strict=True):
                entry.add_(hv, alpha=n_b)

        samples = self._second_backwards(
            names, requests, accumulate, [t for s in sums for t in s.values()]
        )
        return [{n: s / _checked(samples) for n, s in total.items()} for total in sums]

    def _second_backwards(
        self,
        names: list[str],
        requests: list[tuple[dict[str, Tensor], list[str]]],
        consume: Callable[[int, int, dict[str, Tensor], list[Tensor]], None],
        sums: list[Tensor],
    ) -> int:
        """Per batch, the batch's H_b v of every request: `consume(k, n_b, vectors, products)`
        with request k's vectors and its products for its output layers (in their order). One
        forward and first backward per batch serve every request; each request costs one second
        backward. `sums` (what `consume` accumulates into) are all-reduced over ranks; returns
        the sample count N over all ranks."""
        weights = {name: self._weights[name] for name in names}
        vectors = [{n: self._vector(weights[n], v) for n, v in vs.items()} for vs, _ in requests]
        samples = 0
        with self._differentiating(names) as params:
            for n_b, grads in self._batch_gradients(params, create_graph=True):
                samples += n_b
                gradient = dict(zip(names, grads, strict=True))
                for k, (request, (_, outputs)) in enumerate(zip(vectors, requests, strict=True)):
                    terms = [(gradient[n] * v).sum() for n, v in request.items()]
                    dot = torch.stack(terms).sum() if terms else None
                    if dot is None or not dot.requires_grad:
                        continue  # the gradient does not depend on w along v: H v is zero
                    hvs = torch.autograd.grad(
                        dot,
                        [weights[n] for n in outputs],
                        retain_graph=k < len(vectors) - 1,
                        materialize_grads=True,
                    )
                    consume(k, n_b, request, list(hvs))
                    self.on_step()
        (samples,) = distributed.sum_over_ranks(sums, [samples])
        self.passes.gradient_sweeps += 1
        self.passes.second_backward_sweeps += len(vectors)
        return samples

    @staticmethod
    def _vector(weight: Tensor, v: Tensor | None) -> Tensor | None:
        if v is None:
            return None
        if v.shape != weight.shape:
            raise ConfigError(
                f"vector of shape {tuple(v.shape)} does not fit the weight's {tuple(weight.shape)}"
            )
        return v.detach().to(dtype=weight.dtype, device=weight.device)

    def _batch_gradients(
        self, params: list[Tensor], create_graph: bool
    ) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
        """Per batch of this process's share: its sample count n_b and the gradient of its mean
        loss w.r.t. `params`."""
        for batch in distributed.shard(self.data.batches()):
            with _for_second_backward(self.model) if create_graph else nullcontext():
                loss = self.data.loss(self.data.outputs(self.model, batch), batch)
                grads = torch.autograd.grad(
                    loss, params, create_graph=create_graph, materialize_grads=True
                )
            yield self.data.size(batch), grads

    @contextmanager
    def _differentiating(self, names: list[str]) -> Iterator[list[Tensor]]:
        """Eval mode, gradients enabled for the named weights only (the rest of the model is then
        not differentiated, which saves work); every flag is restored on exit."""
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        modes = [(module, module.training) for module in self.model.modules()]
        try:
            self.model.eval()
            for p in params:
                p.requires_grad_(False)
            weights = [self._weights[name].requires_grad_(True) for name in names]
            with torch.enable_grad():
                yield weights
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            for module, training in modes:
                module.training = training


@contextmanager
def _for_second_backward(model: nn.Module) -> Iterator[None]:
    """The forward of a gradient's graph built for a second backward: split convolutions run it
    without PyTorch's unneeded weight-gradient convolutions, and scaled dot-product attention
    runs its math kernel (the fused CPU kernels have no double backward)."""
    with split_convolutions(model), sdpa_kernel(SDPBackend.MATH):
        yield


def _checked(samples: float) -> float:
    if samples == 0:
        raise DataError("the calibration batches hold no samples")
    return samples

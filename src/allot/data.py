"""The data contract: what a user brings, and all the engine knows about data.

- `calibration`: any *re-iterable* collection of batches: a list, a `torch.utils.data.DataLoader`,
  anything whose `iter()` starts again from the first batch. A batch is whatever it yields;
  `inputs(batch)` turns one into the model's inputs (by default `batch_inputs`: a tensor is the
  inputs, an `(inputs, targets, ...)` tuple gives its first item, a dict its entries other than
  "labels" and "targets").
- `loss(outputs, batch) -> Tensor`: the batch's mean loss, a finite scalar; profiling
  differentiates it. `supervised(criterion)` adapts a `criterion(outputs, targets)` such as
  `F.cross_entropy`; `Distill(float_model)` needs no labels (mean squared distance to the float
  model's outputs).
- `evaluate(model) -> dict[str, float]` (optional): held-out metrics, the headline metric first;
  a `"loss"` entry, when there is one, is used to check predicted loss changes on held-out data.
  `loader_evaluation` builds one from a second loader.
- `train` (optional): re-iterable training batches, for refinement that trains.

Batches are streamed: every pass iterates `calibration` again, and nothing here keeps the whole
set. `on_device` moves every batch to the model's device as it is read (`--device`); held-out
evaluations move their batches to the device of the model they evaluate (`model_device`). The calibration loss is the sample-weighted mean sum_b n_b L_b / N, with n_b = `batch_size` of
the batch's inputs (the leading dimension of their first tensor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from allot.exceptions import DataError

Inputs = Any
"""What a model is called with: a tensor, a tuple of tensors (positional arguments) or a dict of
tensors (keyword arguments)."""
Loss = Callable[[Any, Any], Tensor]
"""`loss(outputs, batch)`: the mean loss of a batch, a scalar tensor."""

_TARGET_KEYS = ("labels", "targets")


def batch_inputs(batch: Any) -> Inputs:
    """The model inputs of a batch: a tensor as is, the first item of a tuple or list, or a dict
    without its "labels" and "targets" entries."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("a batch is an empty tuple; expected (inputs, targets, ...)")
        return batch[0]
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
    raise DataError(
        f"cannot find the model inputs in a batch of type {type(batch).__name__}; give "
        "Data(inputs=...) a function from a batch to the model's inputs"
    )


def batch_targets(batch: Any) -> Any:
    """The targets of a batch: the second item of a tuple or list, or a dict's "labels" or
    "targets" entry."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict):
        for key in _TARGET_KEYS:
            if key in batch:
                return batch[key]
    raise DataError(
        "a supervised loss needs targets in every batch: (inputs, targets) pairs, or a dict with "
        "'labels' or 'targets'; for data without labels use the distill loss"
    )


def forward(model: nn.Module, inputs: Inputs) -> Any:
    """Call a model on inputs: keyword arguments for a dict, positional ones for a tuple or list."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a nested structure of tuples, lists and dicts (dicts in key order)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from tensors(value[key])
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors(item)


def batch_size(inputs: Inputs) -> int:
    """Samples in a batch of inputs: the leading dimension of their first tensor."""
    first = next(tensors(inputs), None)
    if first is None or first.dim() == 0:
        raise DataError(
            "cannot count the samples of a batch: its inputs hold no tensor with a batch dimension"
        )
    return int(first.shape[0])


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in its nested tuples, lists and dicts moved to `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (the CPU for a model without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@dataclass(frozen=True)
class OnDevice:
    """A re-iterable collection of batches, each moved to `device` as it is read."""

    batches: Iterable[Any]
    device: torch.device

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield to_device(batch, self.device)

    @staticmethod
    def of(batches: Iterable[Any], device: torch.device) -> OnDevice:
        """`batches` on `device`, sized when they are."""
        return (SizedOnDevice if isinstance(batches, Sized) else OnDevice)(batches, device)


class SizedOnDevice(OnDevice):
    """`OnDevice` of batches that know their number."""

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def take(inputs: Inputs, n: int) -> Inputs:
    """The first `n` samples of a batch of inputs (every tensor sliced along its first dimension)."""
    if isinstance(inputs, Tensor):
        return inputs[:n]
    if isinstance(inputs, dict):
        return {k: take(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(take(v, n) for v in inputs)
    return inputs


def token_mask(inputs: Inputs) -> Tensor | None:
    """Boolean (N, T) mask of the real tokens of a batch of sequences, from its `attention_mask`
    (1 = token, 0 = padding); None for inputs that carry no attention mask. Padding positions are
    masked out of every attention and pooling, so nothing computed there reaches the output."""
    if isinstance(inputs, dict) and isinstance(inputs.get("attention_mask"), Tensor):
        return inputs["attention_mask"].bool()
    return None


def supervised(criterion: Callable[[Any, Any], Tensor]) -> Loss:
    """A loss from `criterion(outputs, targets)` (e.g. `F.cross_entropy`), reading the targets of
    each batch with `batch_targets`."""

    def loss(outputs: Any, batch: Any) -> Tensor:
        return criterion(outputs, batch_targets(batch))

    loss.identity = f"supervised:{_callable_name(criterion)}"  # type: ignore[attr-defined]
    return loss


class Distill:
    """Loss for data without labels: the mean over the batch of the squared distance between the
    model's outputs and the float `reference` model's on the same inputs (computed without
    gradients; the reference is copied in eval mode)."""

    def __init__(self, reference: nn.Module, inputs: Callable[[Any], Inputs] = batch_inputs):
        import copy

        self.reference = copy.deepcopy(reference).eval()
        self.inputs = inputs
        sha = hashlib.sha256()
        for name, tensor in self.reference.state_dict().items():
            sha.update(name.encode())
            sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.identity = f"distill-mse:{sha.hexdigest()}"

    def __call__(self, outputs: Any, batch: Any) -> Tensor:
        with torch.no_grad():
            target = forward(self.reference, self.inputs(batch))
        if not isinstance(outputs, Tensor) or not isinstance(target, Tensor):
            raise DataError("the distill loss needs a model whose outputs are one tensor")
        return (outputs - target).pow(2).flatten(1).sum(1).mean()


def _callable_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


@dataclass(frozen=True)
class Data:
    """A user's data under the contract in this module's docstring. `name` labels it in plans and
    reports."""

    calibration: Iterable[Any]
    loss: Loss
    inputs: Callable[[Any], Inputs] = batch_inputs
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    train: Iterable[Any] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        for field_name in ("calibration", "train"):
            value = getattr(self, field_name)
            if value is None and field_name == "train":
                continue
            if not isinstance(value, Iterable) or isinstance(value, (Tensor, str, bytes, dict)):
                raise DataError(
                    f"Data.{field_name} must be an iterable of batches (a list or a DataLoader), "
                    f"got {type(value).__name__}"
                )
            if isinstance(value, Iterator):
                raise DataError(
                    f"Data.{field_name} is a one-shot iterator, but allot passes over the batches "
                    "several times: give a list or a DataLoader"
                )
            if isinstance(value, Sized) and len(value) == 0:
                raise DataError(f"Data.{field_name} holds no batches; give at least one batch")
        if not callable(self.loss):
            raise DataError(
                f"Data.loss must be callable as loss(outputs, batch), got {self.loss!r}"
            )

    def batches(self) -> Iterator[Any]:
        """The calibration batches, one pass; `DataError` when there are none."""
        empty = True
        for batch in self.calibration:
            empty = False
            yield batch
        if empty:
            raise DataError("the calibration data holds no batches; give at least one batch")

    def batch_count(self) -> int | None:
        """The number of calibration batches, when the collection knows it (None otherwise)."""
        return len(self.calibration) if isinstance(self.calibration, Sized) else None

    def samples(self) -> int:
        """The number of calibration samples (one pass over the batches, reading their sizes)."""
        return sum(self.size(batch) for batch in self.batches())

    def outputs(self, model: nn.Module, batch: Any) -> Any:
        """The model's outputs on a batch."""
        return forward(model, self.inputs(batch))

    def size(self, batch: Any) -> int:
        """Samples in a batch."""
        return batch_size(self.inputs(batch))

    def example_inputs(self, n: int = 1) -> Inputs:
        """The first `n` samples of the first calibration batch (fewer if it is smaller), for
        counting operations and timing."""
        return take(self.inputs(next(self.batches())), n)


def on_device(data: Data, device: torch.device) -> Data:
    """`data` with its calibration and training batches moved to `device` as they are read (the
    same data on the CPU, where batches already are)."""
    if device.type == "cpu":
        return data
    train = None if data.train is None else OnDevice.of(data.train, device)
    return dataclasses.replace(data, calibration=OnDevice.of(data.calibration, device), train=train)


def as_data(data: Any) -> Data:
    """`data` as a `Data`: a `Data` as is, or what an object's `to_data()` returns (the zoo's data
    sets provide it); `DataError` otherwise."""
    if isinstance(data, Data):
        return data
    to_data = getattr(data, "to_data", None)
    if callable(to_data):
        result = to_data()
        if isinstance(result, Data):
            return result
    raise DataError(
        f"expected allot.Data (calibration batches and a loss), got {type(data).__name__}; wrap a "
        "DataLoader as allot.Data(loader, loss=allot.data.supervised(F.cross_entropy))"
    )


def check_data(model: nn.Module, data: Data) -> None:
    """Run the model and the loss on the first calibration batch, without gradients; `DataError`
    in one line when the batch is empty or does not fit the model, the outputs are not finite, or
    the loss is not a finite scalar."""
    batch = next(data.batches())
    inputs = data.inputs(batch)
    if batch_size(inputs) == 0:
        raise DataError("the first calibration batch holds no samples")
    try:
        with torch.no_grad():
            outputs = forward(model.eval(), inputs)
            loss = data.loss(outputs, batch)
    except DataError:
        raise
    except Exception as exc:  # the user's model or loss failed on the user's data
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"the model and loss cannot run on the calibration data ({describe(inputs)}): "
            f"{type(exc).__name__}: {message}"
        ) from exc
    if not all(bool(torch.isfinite(t).all()) for t in tensors(outputs) if t.is_floating_point()):
        raise DataError("the model gives NaN or inf outputs on the calibration data")
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise DataError(
            f"the loss must return a scalar tensor (the batch's mean loss), got {shape}"
        )
    if not math.isfinite(float(loss)):
        raise DataError(
            f"the loss is {float(loss)} on the first calibration batch; it must be finite"
        )


def describe(inputs: Inputs) -> str:
    """Shape summary of inputs, for error messages."""
    if isinstance(inputs, Tensor):
        return f"inputs {tuple(inputs.shape)}"
    if isinstance(inputs, dict):
        return "inputs {" + ", ".join(f"{k}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "inputs (" + ", ".join(describe(v) for v in inputs) + ")"
    return f"inputs of type {type(inputs).__name__}"


def loader_evaluation(
    batches: Iterable[Any],
    loss: Loss,
    inputs: Callable[[Any], Inputs] = batch_inputs,
    accuracy: bool = False,
) -> Callable[[nn.Module], dict[str, float]]:
    """An `evaluate(model)` over held-out `batches`: the sample-weighted mean `loss`, and with
    `accuracy` the fraction of samples whose argmax output equals the target class (listed first,
    as the headline)."""
    held_out = Data(batches, loss, inputs)

    def evaluate(model: nn.Module) -> dict[str, float]:
        total, correct, count = 0.0, 0, 0
        was_training = model.training
        model.eval()
        device = model_device(model)
        try:
            with torch.no_grad():
                for batch in held_out.batches():
                    batch = to_device(batch, device)
                    outputs = held_out.outputs(model, batch)
                    n = held_out.size(batch)
                    total += n * float(loss(outputs, batch))
                    if accuracy:
                        hits = outputs.argmax(dim=-1) == batch_targets(batch)
                        correct += int(hits.sum())
                    count += n
        finally:
            model.train(was_training)
        result = {"accuracy": correct / count} if accuracy else {}
        return {**result, "loss": total / count}

    return evaluate

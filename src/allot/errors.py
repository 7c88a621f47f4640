"""Error models: predict a candidate's damage from its weight perturbation dW = W_hat - W.

Each model is a function of (dW folded to 2-D (out, fan_in), the layer's statistics) returning a
float. Units differ between models, so damages are only comparable within one model:
- `weight`: |dW|_F^2, squared weight error.
- `output`: mean over calibration input patches x of |dW x|^2 = tr(dW C dW') / n with
  C = sum x x' (the layer's input second moment). It is the squared output error the layer adds.
Later models (second-order loss change, the ALDS bound) register here the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from allot.exceptions import ConfigError
from allot.stats import LayerStats


@dataclass(frozen=True)
class ErrorModel:
    """A named damage predictor; `needs_inputs` says whether it uses input second moments."""

    name: str
    damage: Callable[[Tensor, LayerStats | None], float]
    needs_inputs: bool = False
    description: str = ""


def _weight_error(delta: Tensor, stats: LayerStats | None) -> float:
    return float(delta.double().pow(2).sum())


def _output_error(delta: Tensor, stats: LayerStats | None) -> float:
    if stats is None or stats.input_cov is None or stats.samples == 0:
        raise ConfigError("the output error model needs input statistics from calibration data")
    d = delta.double()
    return float(((d @ stats.input_cov) * d).sum() / stats.samples)


ERROR_MODELS: dict[str, ErrorModel] = {
    m.name: m
    for m in (
        ErrorModel("weight", _weight_error, False, "squared weight error |dW|_F^2"),
        ErrorModel("output", _output_error, True, "mean squared output error |dW x|^2"),
    )
}


def get_error_model(name: str) -> ErrorModel:
    if name not in ERROR_MODELS:
        raise ConfigError(f"unknown error model {name!r}; known: {', '.join(sorted(ERROR_MODELS))}")
    return ERROR_MODELS[name]

"""LC, the learning-compression algorithm (Carreira-Perpinan and Idelbayev): train the float
weights towards the plan's compressed form, so that the compressed model, not the float one, ends
up good. Notes and published numbers: ../shared/papers/lc.md; what is ours: docs/lc.md.

Every planned layer l must satisfy w_l = Delta_l(Theta_l), its scheme's decompression. LC solves
min L(w) under those constraints by the augmented Lagrangian, alternating:

- a start (mu = 0, lambda = 0): direct compression, Theta = the applied plan with w the float
  weights; or (`start="feedback"`) error feedback's fit (`refine/feedback.py`) of the layers
  whose scheme re-fits (steered quantization, whitened low rank, sums holding them), which start
  feasible at w = Delta(Theta): LC then starts from the best post-training model of the plan's
  form instead of a projection that may have lost the model (other layers start as direct);
  or (`start="feasible"`) the same, with every other constrained layer starting feasible too,
  at w = Delta(Theta) of its projection (training from the compressed model, as
  quantization-aware training does, rather than pulling the float one towards it);
- for k = 0..K-1, mu = mu0 * growth^k:
  - L step: `epochs` passes of the shared training loop (`refine/train.py`) over the data's
    training batches on L(w) + mu/2 sum_l |w_l - Delta_l - lambda_l / mu|^2, over every trainable
    parameter of the float model (biases and layers kept in float are free);
  - C step: Theta_l = the scheme's own fit to w_l - lambda_l / mu (`Scheme.project`, plain
    weight error, warm-started from the previous Theta_l); with rank selection first the size
    (`Scheme.select`, price 2 alpha / mu per stored bit, alpha in loss units per bit);
  - multipliers: lambda_l -= mu (w_l - Delta_l); without `multipliers` lambda stays 0 (the
    quadratic-penalty method).
With `scaled`, layer l's penalty is mu_l = mu / s_l^2 (s_l the RMS of its float weight) in the
L step, the C step and the multiplier update alike, so mu is per weight in units of the layer's
own scale; with `relative`, the L step's learning rates are fractions of each tensor's RMS
(`refine/train.py`). Together they make LC blind to a constant multiplying a layer, which is what
BatchNorm folding does (a folded ResNet-20's layers differ in mean |w| a hundredfold, and with
absolute rates Adam moves each weight by about `lr` a step whatever its layer's scale).

The model LC reports is always the compressed one, Delta(Theta) with the free parameters'
current values, measured after every step (held-out metrics, or the calibration loss when the
data has none). Nothing here knows a scheme: any plan, from any allocator, is refined the same way.

Determinism: L step k trains with seed `seed + k`, and a training collection that counts its
passes (an integer attribute `passes`, as the zoo's reshuffling batches have) is set to
k * epochs before it, so the batch order depends on the step alone. With `checkpoint`, the state
after each step is saved atomically (`allot.refine.lc_state`); `resume` continues from it to the
result of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from allot.data import Data
from allot.discover import get_weight
from allot.evaluate import metrics
from allot.exceptions import ConfigError
from allot.modules.base import dense_weight
from allot.plan import Plan
from allot.profile.measure import mean_loss
from allot.progress import progress_counter
from allot.refine.feedback import feedback, refined_layers
from allot.refine.lc_state import LCState, load_state, save_state
from allot.refine.train import OPTIMIZERS, SCHEDULES, TrainSettings, train
from allot.schemes import Scheme

STARTS = ("direct", "feedback", "feasible")


@dataclass(frozen=True)
class LCSettings:
    """The LC schedule: `steps` values of mu = `mu0` * `growth`^k; each L step `epochs` passes
    with `optimizer` (`adam`, or `sgd` with `momentum`) from learning rate `lr` * `lr_decay`^k,
    constant within the step or decayed to 0 by a cosine (`schedule`), from a fresh optimiser;
    `relative`: the rate is a fraction of each parameter tensor's RMS (`TrainSettings`);
    `scaled`: each layer's penalty is mu / s_l^2 with s_l the RMS of its float weight, so mu is
    per weight in units of the layer's own scale (see the module's docstring);
    `start`: `direct` (Theta from the applied plan, w the float weights), `feedback` (error
    feedback re-fits the layers whose scheme re-fits, and they start feasible, w = Delta(Theta);
    the others start as `direct`) or `feasible` (as `feedback`, and every layer starts feasible);
    `multipliers` False gives the quadratic-penalty method;
    `rank_alpha` (loss units per stored bit) turns on rank selection in the C steps; `seed` of
    the L steps; `checkpoint` a directory for the state after each step, `resume` to continue
    from it."""

    steps: int = 20
    mu0: float = 1e-2
    growth: float = 1.3
    epochs: int = 1
    lr: float = 1e-3
    lr_decay: float = 1.0
    optimizer: str = "adam"
    momentum: float = 0.9
    schedule: str = "cosine"
    relative: bool = False
    scaled: bool = False
    start: str = "feedback"
    multipliers: bool = True
    rank_alpha: float | None = None
    seed: int = 0
    checkpoint: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "epochs", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"LC {name} must be a whole number >= 0, got {value!r}")
        for name in ("mu0", "growth", "lr", "lr_decay"):
            value = getattr(self, name)
            least = 1.0 if name == "growth" else 0.0
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value >= least and value > 0):
                raise ConfigError(
                    f"LC {name} must be a finite number {'>= 1' if least else '> 0'}, got {value!r}"
                )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"LC optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"LC schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.start not in STARTS:
            raise ConfigError(f"LC start must be one of {STARTS}, got {self.start!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"LC momentum must be in [0, 1), got {self.momentum!r}")
        alpha = self.rank_alpha
        if alpha is not None and not (
            isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0
        ):
            raise ConfigError(f"LC rank_alpha must be a positive number, got {alpha!r}")

    def mu(self, step: int) -> float:
        """The penalty of step `step` (0-based)."""
        return self.mu0 * self.growth**step

    def identity(self, plan: Plan) -> dict[str, Any]:
        """What a resumed run must share with the checkpointed one: every setting that shapes
        the steps (not how many there are, nor where they are saved) and the starting plan."""
        settings = dataclasses.asdict(self)
        for name in ("steps", "checkpoint", "resume"):
            settings.pop(name)
        return {
            "settings": settings,
            "plan": {layer.name: layer.scheme.to_json() for layer in plan.layers},
        }


def learning_compression(
    reference: nn.Module,
    model: nn.Module,
    plan: Plan,
    data: Data,
    settings: LCSettings,
    progress: bool = True,
) -> nn.Module:
    """Refine `model` (the plan applied to `reference`, the float BatchNorm-folded model) by LC,
    in place; returns it. The plan's schemes change only under rank selection, and its
    metadata gains `lc`: the settings and, per step, mu, the L step's training loss, the
    constraint gap sum |w - Delta|^2 / sum |w|^2 and the compressed model's measurements."""
    identity = settings.identity(plan)
    directory = Path(settings.checkpoint) if settings.checkpoint else None
    saved = load_state(directory, identity) if directory and settings.resume else None
    if saved is None and settings.start != "direct":
        feedback(reference, model, plan, data, progress)
    run = _Run(reference, model, plan, data, settings)
    if saved is None:
        run.record(0, 0.0, None)
        if directory is not None:
            save_state(directory, run.state(0), identity)
    else:
        run.restore(saved)
    start = len(run.history) - 1
    with progress_counter("LC", progress, settings.steps) as advance:
        for _ in range(min(start, settings.steps)):
            advance(run.note())
        for step in range(start, settings.steps):
            mu = settings.mu(step)
            loss = run.l_step(step, mu)
            run.c_step(mu)
            run.record(step + 1, mu, loss)
            if directory is not None:
                save_state(directory, run.state(step + 1), identity)
            advance(run.note())
    run.finish()
    return model


class _Run:
    """One LC run's state: the free float model, Theta, lambda, the schemes, the history."""

    def __init__(
        self, reference: nn.Module, model: nn.Module, plan: Plan, data: Data, settings: LCSettings
    ) -> None:
        self.model, self.plan, self.data, self.settings = model, plan, data, settings
        self.free = copy.deepcopy(reference).eval()
        self.layers = {layer.name: layer for layer in plan.layers}
        self.schemes: dict[str, Scheme] = {n: layer.scheme for n, layer in self.layers.items()}
        self.theta = {name: copy.deepcopy(model.get_submodule(name)) for name in self.layers}
        self.multipliers = {
            name: torch.zeros(layer.spec.weight_shape, device=self.weight(name).device)
            for name, layer in self.layers.items()
            if layer.scheme.constrains
        }
        # each layer's unit of squared weight: its float weight's mean square, or 1
        self.units = {name: _unit(self.weight(name), settings.scaled) for name in self.multipliers}
        feasible = {
            "direct": (),
            "feedback": refined_layers(plan),  # where feedback fitted Theta
            "feasible": self.multipliers,
        }[settings.start]
        with torch.no_grad():
            for name in feasible:
                if name in self.multipliers:
                    self.weight(name).copy_(dense_weight(self.theta[name]))
        self.history: list[dict[str, Any]] = []

    def weight(self, name: str) -> nn.Parameter:
        return self.free.get_submodule(name).weight

    def l_step(self, step: int, mu: float) -> float:
        """Train the free model on the loss plus the penalty; the last epoch's mean loss."""
        s = self.settings
        targets = {
            name: (dense_weight(self.theta[name]) + lam * (self.units[name] / mu)).detach()
            for name, lam in self.multipliers.items()
        }

        def penalty() -> Tensor:
            return (
                mu
                / 2
                * sum(
                    (self.weight(name) - target).pow(2).sum() / self.units[name]
                    for name, target in targets.items()
                )
            )

        if isinstance(getattr(self.data.train, "passes", None), int):
            self.data.train.passes = step * s.epochs  # type: ignore[union-attr]
        history = train(
            self.free,
            self.data,
            TrainSettings(
                epochs=s.epochs,
                lr=s.lr * s.lr_decay**step,
                optimizer=s.optimizer,
                momentum=s.momentum,
                schedule=s.schedule,
                seed=s.seed + step,
                relative=s.relative,
            ),
            extra_loss=penalty if targets else None,
            progress=False,
            label=f"LC L step {step + 1}",
        )
        return history[-1] if history else math.nan

    @torch.no_grad()
    def c_step(self, mu: float) -> None:
        """Fit every layer's scheme to w - lambda / mu_l, then update the multipliers
        (mu_l = mu / the layer's unit)."""
        alpha = self.settings.rank_alpha
        for name, layer in self.layers.items():
            weight, bias = get_weight(self.free, name)
            lam = self.multipliers.get(name)
            layer_mu = mu / self.units.get(name, 1.0)
            target = weight if lam is None else weight - lam / layer_mu
            scheme = self.schemes[name]
            if alpha is not None:
                scheme = scheme.select(target, layer.spec, 2 * alpha / layer_mu)
            previous = self.theta[name] if scheme == self.schemes[name] else None
            self.schemes[name] = scheme
            self.theta[name] = scheme.project(target, bias, layer.spec, previous)
            if lam is not None and self.settings.multipliers:
                lam -= layer_mu * (weight - dense_weight(self.theta[name]))

    def gaps(self) -> tuple[float, float]:
        """The constraint gap over the constrained layers: sum_l |w_l - Delta_l|^2 / sum_l
        |w_l|^2, and the largest layer's own |w_l - Delta_l|^2 / |w_l|^2 (0, 0 when none)."""
        with torch.no_grad():
            pairs = [
                (float(w.double().pow(2).sum()), float((w - d).double().pow(2).sum()))
                for w, d in (
                    (self.weight(n), dense_weight(self.theta[n])) for n in self.multipliers
                )
            ]
        total = sum(size for size, _ in pairs)
        worst = max((distance / size for size, distance in pairs if size > 0), default=0.0)
        return (sum(distance for _, distance in pairs) / total if total > 0 else 0.0), worst

    def assemble(self) -> None:
        """Write the compressed model: Theta for the planned layers, the free model's values
        for every other parameter and buffer."""
        for name in self.layers:
            self.model.set_submodule(name, copy.deepcopy(self.theta[name]))
        planned = tuple(f"{name}." for name in self.layers)
        rest = {k: v for k, v in self.free.state_dict().items() if not k.startswith(planned)}
        result = self.model.load_state_dict(rest, strict=False)
        if result.unexpected_keys:
            raise ConfigError(
                "the compressed model does not hold the float model's other parameters "
                f"({', '.join(result.unexpected_keys[:3])}); was the plan applied to this model?"
            )
        self.model.eval()

    def record(self, step: int, mu: float, loss: float | None) -> None:
        """Assemble the compressed model and append its measurements to the history."""
        self.assemble()
        measured = metrics(self.model, self.data)
        if not measured:
            measured = {"calibration_loss": mean_loss(self.model, self.data)}
        gap, worst = self.gaps()
        self.history.append(
            {
                "step": step,
                "mu": mu,
                "train_loss": loss,
                "gap": gap,
                "worst_gap": worst,
                "bits": sum(s.storage_bits(self.layers[n].spec) for n, s in self.schemes.items()),
                "metrics": measured,
            }
        )

    def note(self) -> str:
        """The latest measurement, for the progress bar."""
        last = self.history[-1]
        key, value = next(iter(last["metrics"].items()))
        return f"mu {last['mu']:.2e} {key} {value:.4f}"

    def state(self, step: int) -> LCState:
        return LCState(
            step,
            self.free.state_dict(),
            {name: module.state_dict() for name, module in self.theta.items()},
            self.multipliers,
            self.schemes,
            self.history,
        )

    def restore(self, saved: LCState) -> None:
        """Continue from a checkpoint: the free model, Theta, lambda, schemes and history."""
        self.free.load_state_dict(saved.free)
        for name, layer in self.layers.items():
            scheme = saved.schemes[name]
            module = scheme.empty(layer.spec)
            module.load_state_dict(saved.theta[name])
            self.schemes[name], self.theta[name] = scheme, module
        for name in self.multipliers:
            self.multipliers[name] = saved.multipliers[name].clone()
        self.history = list(saved.history)
        self.assemble()

    def finish(self) -> None:
        """Leave the plan's schemes and metadata as the run ended."""
        for layer in self.plan.layers:
            layer.scheme = self.schemes[layer.name]
        self.plan.metadata["lc"] = {
            "settings": dataclasses.asdict(self.settings),
            "history": self.history,
        }


def _unit(weight: Tensor, scaled: bool) -> float:
    """A layer's unit of squared weight: the mean square of its float weight with `scaled`
    (1 for a weight of zeros), else 1."""
    if not scaled:
        return 1.0
    square = float(weight.detach().double().pow(2).mean())
    return square if square > 0 else 1.0

"""allot.runtime on low-rank layers: the faster of the two factors and their dense product, chosen
per input shape from timings (here a scripted clock, so no test depends on wall-clock time),
gives the factorized layer's outputs and leaves the stored factors and the artifact as they were."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from allot import Budget, LayerPlan, Plan, apply, runtime, save
from allot.api import prepare
from allot.cli import main
from allot.data import forward
from allot.discover import LayerSpec
from allot.evaluate import layer_macs
from allot.io import WEIGHTS
from allot.modules.lowrank import LowRankLayer
from allot.runtime.lowrank import DENSE, FACTORS, ROUNDS, UNDECIDED, FasterForm, faster
from allot.schemes import LowRank
from allot.zoo import create_model

SPECS = [
    LayerSpec("linear", 32, 24),
    LayerSpec("conv2d", 8, 12, (3, 3), stride=(2, 2), padding=(1, 1), bias=True),
    LayerSpec("conv2d", 8, 12, (1, 1), bias=False),
    LayerSpec("conv1d", 6, 10, (5,), padding=(2,)),
]
TOLERANCE = 1e-5  # float32: one product U V against two, relative


def _layer(spec: LayerSpec, rank: int = 3, seed: int = 0) -> LowRankLayer:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(spec.weight_shape, generator=g) / spec.fan_in**0.5
    bias = torch.randn(spec.out_features, generator=g) if spec.bias else None
    layer = LowRank(rank).compress(weight, bias, spec)
    assert isinstance(layer, LowRankLayer)
    return layer


def _input(spec: LayerSpec, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "linear":
        return torch.randn(batch, 5, spec.in_features, generator=g)
    size = (9,) if spec.kind == "conv1d" else (7, 7)
    return torch.randn(batch, spec.in_features, *size, generator=g)


def _clock(factors: float, dense: float):
    """A clock under which every call of the factors takes `factors` seconds and every call of the
    dense product `dense` (the runner times them in that order, each between two readings)."""
    ticks = itertools.accumulate(itertools.cycle([1.0, factors, 1.0, dense]))
    return lambda: next(ticks)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spec", SPECS)
def test_the_factors_compute_the_dense_products_operation_batched_or_not(spec) -> None:
    layer = _layer(spec)
    x = _input(spec, batch=3).double()
    with torch.no_grad():
        exact = spec.forward(
            x, layer.reconstruct().double(), layer.bias.double() if spec.bias else None
        )
        for sample in (x.float(), x[0].float()):
            expected = exact if sample.dim() == x.dim() else exact[0]
            assert _relative(layer.factored(sample).double(), expected) <= TOLERANCE


def test_faster_takes_the_fastest_call_and_keeps_the_factors_on_a_tie() -> None:
    assert faster([3.0, 1.0, 2.0], [1.5, 9.0, 0.9]) == DENSE  # fastest 1 and 0.9
    assert faster([1.0, 5.0, 9.0], [2.0, 1.1, 2.0]) == FACTORS  # fastest 1 and 1.1, medians 5, 2
    assert faster([2.0, 2.0], [2.0, 2.0]) == FACTORS


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(("factors", "dense", "form"), [(2.0, 1.0, DENSE), (1.0, 2.0, FACTORS)])
def test_the_chosen_form_gives_the_factorized_outputs(spec, factors, dense, form) -> None:
    layer = _layer(spec)
    x = _input(spec)
    with torch.no_grad():
        expected = layer(x)
        layer.runner = FasterForm(_clock(factors, dense))
        out = layer(x)
        again = layer(x)
    assert layer.runner.forms == {tuple(x.shape): form}
    assert layer.runner.label == form
    if form == FACTORS:
        assert torch.equal(out, expected) and layer.runner.weight is None
    else:
        assert _relative(out, expected) <= TOLERANCE
    assert torch.equal(again, out)


def test_the_choice_is_the_same_for_the_same_timings() -> None:
    spec = SPECS[1]
    x = _input(spec)
    chosen = set()
    for _ in range(3):
        layer = _layer(spec)
        layer.runner = FasterForm(_clock(1.0 + 1e-9, 1.0))
        with torch.no_grad():
            layer(x)
        chosen.add(layer.runner.label)
    assert chosen == {DENSE}


def test_each_input_shape_is_timed_once_and_the_dense_weight_kept_only_where_it_runs() -> None:
    spec = SPECS[1]
    layer = _layer(spec)
    readings = []
    clock = _clock(2.0, 1.0)

    def counting() -> float:
        readings.append(None)
        return clock()

    layer.runner = runner = FasterForm(counting)
    small, large = _input(spec, batch=1), _input(spec, batch=4)
    with torch.no_grad():
        layer(small)
        layer(small)
        assert len(readings) == 4 * ROUNDS  # two readings per call, two forms per round
        assert runner.ran_dense and runner.weight is not None
        runner.clock = _clock(1.0, 2.0)
        layer(large)
        assert runner.forms == {tuple(small.shape): DENSE, tuple(large.shape): FACTORS}
        assert runner.label == f"{DENSE} / {FACTORS}" and not runner.ran_dense
        assert runner.weight is not None  # still needed for the small batch

    other = _layer(spec)
    other.runner = FasterForm(_clock(1.0, 2.0))
    with torch.no_grad():
        other(small)
    assert other.runner.forms == {tuple(small.shape): FACTORS} and other.runner.weight is None


def test_new_factors_are_timed_again_and_never_run_stale() -> None:
    spec = SPECS[1]
    layer, other = _layer(spec, seed=0), _layer(spec, seed=5)
    x = _input(spec)
    layer.runner = FasterForm(_clock(2.0, 1.0))
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())  # copied in place
        assert _relative(layer(x), other(x)) <= TOLERANCE
        assert layer.runner.forms == {tuple(x.shape): DENSE}


def test_macs_count_the_form_that_ran() -> None:
    spec = SPECS[1]
    x = _input(spec)
    out_positions = 2 * 4 * 4  # batch 2, 7x7 at stride 2 with padding 1
    counts = {}
    for factors, dense in [(1.0, 2.0), (2.0, 1.0)]:
        model = nn.Sequential(_layer(spec))
        model[0].runner = FasterForm(_clock(factors, dense))
        counts[faster([factors], [dense])] = layer_macs(model, x)["0"]
    full = out_positions * spec.out_features * spec.fan_in
    assert counts[DENSE] == (full, full)
    assert counts[FACTORS] == (full, out_positions * 3 * (spec.fan_in + spec.out_features))


def test_with_gradients_the_factors_run() -> None:
    spec = SPECS[1]
    layer = _layer(spec)
    x = _input(spec)
    layer.runner = FasterForm(_clock(2.0, 1.0))
    out = layer(x)
    assert layer.runner.forms == {}
    assert torch.equal(out, layer.factored(x))
    out.sum().backward()
    assert layer.u.grad is not None and layer.v.grad is not None


def test_prepare_times_low_rank_layers_only_under_cache() -> None:
    model = nn.Sequential(_layer(SPECS[0]), nn.ReLU(), nn.Linear(SPECS[0].out_features, 4))
    assert runtime.prepare(model, kernels=True) == {"0": "own operations"}
    assert runtime.prepare(model, cache=True) == {"0": UNDECIDED}
    with torch.no_grad():
        model(_input(SPECS[0]))
    assert runtime.describe(model)["0"] in (DENSE, FACTORS)
    runtime.release(model)
    assert runtime.describe(model) == {"0": "own operations"}


def test_the_artifact_and_the_stored_factors_do_not_change(tmp_path, digits) -> None:
    _, folded, discovery, _ = prepare(create_model("test-cnn"))
    layers = [LayerPlan(layer.name, layer.spec, LowRank(2)) for layer in discovery.layers]
    plan = Plan("test-cnn", "rank", "none", Budget("ratio", 2), layers, folded=folded)
    model = apply(create_model("test-cnn"), plan)
    before = (save(model, plan, tmp_path / "before") / WEIGHTS).read_bytes()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = digits.inputs(next(iter(digits.calibration)))
    with torch.no_grad():
        expected = forward(model, inputs)
        assert runtime.prepare(model, cache=True) == {"0": UNDECIDED, "5": UNDECIDED}
        for _ in range(2):
            assert _relative(forward(model, inputs), expected) <= TOLERANCE
    after = (save(model, plan, tmp_path / "after") / WEIGHTS).read_bytes()
    assert after == before
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_evaluate_reports_the_forms_low_rank_layers_chose(tmp_path, capsys) -> None:
    out = tmp_path / "mlp"
    args = ["--no-progress", "compress", "test-mlp", "--method", "uniform-rank", "--ratio", "2"]
    assert main([*args, "--out", str(out), "--calibration", "64"]) == 0
    capsys.readouterr()
    assert main(["--no-progress", "evaluate", str(out)]) == 0
    plain = capsys.readouterr().out
    assert main(["--no-progress", "evaluate", str(out), "--cache-weights"]) == 0
    fast = capsys.readouterr().out
    runtime_line = next(x for x in fast.splitlines() if x.startswith("runtime:"))
    assert UNDECIDED not in runtime_line and (DENSE in runtime_line or FACTORS in runtime_line)

    def accuracy(text: str) -> float:
        return float(next(x for x in text.splitlines() if x.startswith("accuracy:")).split()[1])

    assert accuracy(fast) == pytest.approx(accuracy(plain), abs=0.01)

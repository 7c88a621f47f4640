"""allot.runtime: cached weights reproduce the dequantized layer exactly, kernels within their
bfloat16 tolerance, both only when asked for and never with stale tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from allot import runtime
from allot.cli import main
from allot.discover import LayerSpec
from allot.modules.quant import GRIDS
from allot.runtime.kernels import int4_group, int8_fits
from allot.schemes import LowRank, Quant, Scheme, Sparse, Sum

LINEAR = LayerSpec("linear", 32, 64)
CONV = LayerSpec("conv2d", 8, 4, (3, 3), padding=(1, 1))
KERNEL_TOLERANCE = 1e-2  # bfloat16 activations: about 0.3% relative measured


def _layer(scheme: Scheme, spec: LayerSpec = LINEAR, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(spec.weight_shape, generator=g) / spec.fan_in**0.5
    bias = torch.randn(spec.out_features, generator=g) if spec.bias else None
    return scheme.compress(weight, bias, spec)


def _input(spec: LayerSpec, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 5, spec.in_features) if spec.kind == "linear" else (2, spec.in_features, 6, 6)
    return torch.randn(shape, generator=g)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("scheme", "spec"),
    [
        (Quant(4), LINEAR),
        (Quant(3, 4, grid="symmetric"), CONV),
        (Sparse(0.2), LINEAR),
        (Sum((Quant(2), Sparse(0.05))), CONV),
    ],
)
def test_cached_weights_give_exactly_the_dequantized_outputs(scheme, spec) -> None:
    layer = _layer(scheme, spec)
    x = _input(spec)
    with torch.no_grad():
        expected = layer(x)
        model = nn.Sequential(layer)
        assert runtime.cache_weights(model) == {"0": "cached weight"}
        assert torch.equal(model(x), expected)
        runtime.release(model)
        assert runtime.describe(model) == {"0": "dequantize"}


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(("bits", "group"), [(1, None), (2, 32), (3, None), (4, None), (4, 64)])
def test_int4_kernel_matches_the_dequantized_layer(bits, group, grid) -> None:
    layer = _layer(Quant(bits, group, grid=grid))
    x = _input(LINEAR)
    with torch.no_grad():
        expected = layer(x)
        model = nn.Sequential(layer)
        assert runtime.prepare(model, kernels=True) == {"0": "int4 kernel"}
        assert _relative(model(x), expected) < KERNEL_TOLERANCE


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("bits", [5, 8])
def test_int8_kernel_matches_the_dequantized_layer(bits, grid) -> None:
    layer = _layer(Quant(bits, grid=grid))
    x = _input(LINEAR)
    with torch.no_grad():
        expected = layer(x)
        model = nn.Sequential(layer)
        assert runtime.prepare(model, kernels=True) == {"0": "int8 kernel"}
        assert _relative(model(x), expected) < KERNEL_TOLERANCE


@pytest.mark.parametrize(
    ("scheme", "spec", "reason"),
    [
        (Quant(4), CONV, "convolution"),
        (Quant(4), LayerSpec("linear", 24, 64), "outputs not a multiple of 16"),
        (Quant(4, 16), LINEAR, "group of 16"),
        (Quant(8, 32), LINEAR, "grouped 8-bit"),
        (Quant(8), LayerSpec("linear", 32, 40), "fan-in not a multiple of 32"),
        (Sparse(0.2), LINEAR, "not quantized"),
    ],
)
def test_layouts_no_kernel_runs_fall_back_to_the_cache_or_to_dequantizing(
    scheme, spec, reason
) -> None:
    layer = _layer(scheme, spec)
    assert int4_group(layer) is None and not int8_fits(layer), reason
    model = nn.Sequential(layer)
    assert runtime.prepare(model, kernels=True) == {"0": "dequantize"}
    assert runtime.prepare(model, kernels=True, cache=True) == {"0": "cached weight"}


def test_low_rank_layers_keep_their_own_operations_without_cache() -> None:
    model = nn.Sequential(
        _layer(LowRank(4)), nn.ReLU(), _layer(Quant(4), LayerSpec("linear", 16, 32))
    )
    assert runtime.prepare(model, kernels=True) == {"0": "own operations", "2": "int4 kernel"}


@pytest.mark.parametrize("kernels", [False, True])
def test_a_runner_never_computes_with_stale_tensors(kernels: bool) -> None:
    layer, other = _layer(Quant(4), seed=0), _layer(Quant(4), seed=5)
    x = _input(LINEAR)
    model = nn.Sequential(layer)
    runtime.prepare(model, kernels=kernels, cache=True)
    tolerance = KERNEL_TOLERANCE if kernels else 0.0
    with torch.no_grad():
        first = model(x)
        layer.load_state_dict(other.state_dict())  # copied in place
        assert _relative(model(x), other(x)) <= tolerance
        layer.codes = _layer(Quant(4), seed=7).codes  # replaced
        assert not torch.equal(model(x), first)
        runtime.release(model)
        expected = model(x)
        runtime.prepare(model, kernels=kernels, cache=True)
        assert _relative(model(x), expected) <= tolerance


def test_with_gradients_the_stored_tensors_run() -> None:
    layer = _layer(Quant(4))
    x = _input(LINEAR)
    with torch.no_grad():
        expected = layer(x)
    model = nn.Sequential(layer)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    runtime.prepare(model, kernels=True, cache=True)
    out = model(x)  # gradients enabled: the dequantized weight, exactly
    assert torch.equal(out, expected)
    out.sum().backward()
    assert layer.bias.grad is not None
    assert list(layer.state_dict()) == list(state)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in state.items())


def test_evaluate_runs_an_artifact_on_kernels_and_cached_weights(tmp_path, capsys) -> None:
    out = tmp_path / "mlp"
    args = ["--no-progress", "compress", "test-mlp", "--method", "uniform-quant", "--bits", "4"]
    assert main([*args, "--out", str(out), "--calibration", "64"]) == 0
    capsys.readouterr()
    assert main(["--no-progress", "evaluate", str(out)]) == 0
    plain = capsys.readouterr().out
    flags = ["--kernels", "--cache-weights", "--latency"]
    assert main(["--no-progress", "evaluate", str(out), *flags]) == 0
    fast = capsys.readouterr().out
    assert "runtime: 1 cached weight, 1 int4 kernel" in fast and "latency_ratio" in fast

    def accuracy(text: str) -> float:
        return float(next(x for x in text.splitlines() if x.startswith("accuracy:")).split()[1])

    assert abs(accuracy(fast) - accuracy(plain)) <= 0.02
    assert main(["--no-progress", "evaluate", "test-mlp", "--kernels"]) == 2
    assert "apply to an artifact" in capsys.readouterr().err

import pytest
import torch
from peers.base import Setting, ratio
from peers.dynamic import PEERS
from torch import nn

from allot.data import forward
from allot.discover import discover
from allot.exceptions import ConfigError
from allot.zoo import create_model

dynamic = pytest.importorskip(
    "torch.ao.nn.quantized.dynamic", reason="this torch has no eager-mode dynamic quantization"
)

PEER = PEERS[0]


@pytest.fixture(scope="module")
def mlp(model, dataset):
    layers = discover(model).layers
    return model, dataset, layers, PEER.run(model, dataset, layers, PEER.settings()[0])


def test_version_and_availability() -> None:
    assert PEER.unavailable() is None
    assert PEER.version() == torch.__version__
    assert len(PEER.settings()) == 1


def test_stored_bits_are_int8_codes_and_one_scale_and_zero_point(mlp) -> None:
    model, _, layers, run = mlp
    assert set(run.stored_bits) == {layer.name for layer in layers}
    for layer in layers:
        module = run.model.get_submodule(layer.name)
        assert isinstance(module, dynamic.Linear)
        weight = module.weight()
        assert weight.dtype == torch.qint8 and weight.qscheme() == torch.per_tensor_affine
        assert weight.int_repr().dtype == torch.int8
        count = model.get_submodule(layer.name).weight.numel()
        # int8 codes, a float64 scale and an int64 zero point per tensor.
        assert run.stored_bits[layer.name] == 8 * count + 64 + 64
    assert ratio(model, layers, run.stored_bits) == pytest.approx(4.0, rel=0.02)


def test_weights_lie_on_a_symmetric_grid_within_half_a_step(mlp) -> None:
    model, _, layers, run = mlp
    for layer in layers:
        original = model.get_submodule(layer.name).weight.detach()
        weight = run.model.get_submodule(layer.name).weight()
        scale = weight.q_scale()
        assert weight.q_zero_point() == 0
        assert scale == pytest.approx(original.abs().max().item() / 127.5, rel=1e-6)
        error = (weight.dequantize() - original).abs()
        assert error.max().item() <= 0.5 * scale * (1 + 1e-5)


def test_int8_keeps_the_float_metrics_and_the_float_model(mlp) -> None:
    model, dataset, layers, run = mlp
    float_metrics = dataset.task.evaluate(model, dataset)
    metrics = dataset.task.evaluate(run.model, dataset)
    assert abs(metrics["accuracy"] - float_metrics["accuracy"]) <= 0.01
    assert metrics["loss"] == pytest.approx(float_metrics["loss"], rel=0.02)
    assert all(type(model.get_submodule(layer.name)) is nn.Linear for layer in layers)


def test_the_model_runs_the_dynamic_int8_kernel(mlp) -> None:
    _, dataset, layers, run = mlp
    inputs, _ = next(dataset.test.batches(64))
    # Dequantized weights in float differ from the kernel, which also quantizes its inputs.
    float_copy = create_model("test-mlp")
    for layer in layers:
        weight = run.model.get_submodule(layer.name).weight().dequantize()
        float_copy.get_submodule(layer.name).weight.data = weight
    with torch.no_grad():
        kernel, reference = forward(run.model, inputs), forward(float_copy, inputs)
    assert not torch.equal(kernel, reference)
    assert torch.allclose(kernel, reference, atol=0.1)


def test_options_are_rejected(mlp) -> None:
    model, dataset, layers, _ = mlp
    with pytest.raises(ConfigError, match="takes no options"):
        PEER.run(model, dataset, layers, Setting("x", {"bits": 4}))

import pytest
import torch
from torch import nn

from allot.discover import Layer, LayerSpec
from allot.errors import get_error_model
from allot.profile.activations import input_statistics

LAYERS = {
    "linear": (nn.Linear(6, 4), (3, 5, 6)),
    "conv1d": (nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (2, 3, 11)),
    "conv2d": (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 2, 7, 6)),
    "same": (nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 6, 5)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_output_error_model_equals_the_measured_output_error(kind: str) -> None:
    """tr(dW C dW') over the unfolded patches is exactly the squared output error |dW * x|^2."""
    module, shape = LAYERS[kind]
    module = module.double()
    spec = LayerSpec.from_module(module)
    batches = [(torch.randn(shape, dtype=torch.float64), torch.zeros(shape[0])) for _ in range(2)]
    stats = input_statistics(module, [Layer("", spec)], batches, progress=False)[""]
    delta = torch.randn(spec.weight_shape, dtype=torch.float64)
    predicted = get_error_model("output").damage(delta.reshape(spec.out_features, -1), stats)
    measured = sum(float(spec.forward(x, delta, None).pow(2).sum()) for x, _ in batches)
    positions = sum(spec.forward(x, delta, None).numel() // spec.out_features for x, _ in batches)
    assert stats.samples == positions
    assert predicted * stats.samples == pytest.approx(measured, rel=1e-9)

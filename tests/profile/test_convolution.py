"""Split convolutions: the plain convolution's values and derivatives, with less work."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from allot.profile import convolution
from allot.profile.convolution import split_convolutions

# (conv, input shape, weight shape, keyword arguments)
CASES = {
    "1d-strided": (F.conv1d, (3, 4, 9), (6, 2, 3), dict(stride=2, padding=1, groups=2)),
    "2d-dilated": (F.conv2d, (2, 3, 7, 6), (4, 3, 3, 2), dict(padding=(2, 1), dilation=(2, 1))),
    "2d-rounding": (F.conv2d, (2, 2, 6, 6), (3, 2, 3, 3), dict(stride=2)),
    "3d": (F.conv3d, (1, 2, 4, 5, 4), (2, 2, 2, 3, 2), dict(stride=(1, 2, 1))),
}


def _second_order(kind: str, split: bool) -> tuple[torch.Tensor, ...]:
    """Output, gradients and an input-weight Hessian-vector product of a tanh-squared loss."""
    conv, x_shape, w_shape, kwargs = CASES[kind]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(w_shape, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=torch.float64, generator=generator)
    vx = torch.randn(x_shape, dtype=torch.float64, generator=generator)
    vw = torch.randn(w_shape, dtype=torch.float64, generator=generator)
    model = nn.Conv1d(1, 1, 1)  # any model with a convolution turns the split on
    with split_convolutions(model) if split else torch.enable_grad():
        y = conv(x, w, b, **kwargs)
        gx, gw = torch.autograd.grad(torch.tanh(y).pow(2).sum(), [x, w], create_graph=True)
    hx, hw = torch.autograd.grad((gx * vx).sum() + (gw * vw).sum(), [x, w])
    return y, gx, gw, hx, hw


@pytest.mark.parametrize("kind", sorted(CASES))
def test_values_and_derivatives_are_the_plain_convolutions(kind: str) -> None:
    for split, plain in zip(_second_order(kind, True), _second_order(kind, False), strict=True):
        torch.testing.assert_close(split, plain, rtol=1e-10, atol=1e-12)


def test_a_weights_node_runs_only_where_its_gradient_is_needed(monkeypatch) -> None:
    calls = []
    backward = convolution._WeightPath.backward

    def counting(ctx, grad):
        calls.append(ctx.saved_tensors[0].shape)
        return backward(ctx, grad)

    monkeypatch.setattr(convolution._WeightPath, "backward", staticmethod(counting))
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 4, 3)).double()
    first, second = model[0].weight, model[2].weight
    with split_convolutions(model):
        loss = model(torch.randn(2, 2, 7, 7, dtype=torch.float64)).pow(2).sum()
        g1, _ = torch.autograd.grad(loss, [first, second], create_graph=True)
    assert len(calls) == 2
    # H_11 v: the second backward passes the second convolution but needs only the first weight
    torch.autograd.grad((g1 * torch.randn_like(g1)).sum(), [first])
    assert calls[2:] == [first.shape]


def test_string_padding_and_models_without_convolutions_run_the_plain_path() -> None:
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    with split_convolutions(nn.Conv2d(1, 1, 1)):
        same = F.conv2d(x, w, padding="same")
    assert same.grad_fn.name() == "ConvolutionBackward0"
    with split_convolutions(nn.Linear(2, 2)):
        plain = F.conv2d(x, w)
    assert plain.grad_fn.name() == "ConvolutionBackward0"
    torch.testing.assert_close(same[..., 1:-1, 1:-1], plain)

"""Exact float64 references for curvature tests: tiny models, their data, and the gradient and
Hessian of the full-data loss by torch.autograd (shared by the profile and prediction tests)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from allot.data import Data, supervised


class SelfAttention(nn.Module):
    """One head of self-attention over the tokens by `F.scaled_dot_product_attention`, whose
    fused CPU kernel has no double backward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v).squeeze(1)


# name -> (model factory, input shape of one sample, profiled layers)
MODELS = {
    "mlp": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 4)),
        (5,),
        ["0", "3"],
    ),
    "conv1d": (
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
        (2, 6),
        ["0", "3"],
    ),
    "conv2d": (
        lambda: nn.Sequential(nn.Conv2d(2, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)),
        (2, 4, 4),
        ["0", "3"],
    ),  # two convolutions in a row (the split graph of allot.profile.convolution between them), with
    # a stride that rounds (output padding), groups, dilation and biases; the linear head is fixed
    "convnet": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(36, 3),
        ),
        (2, 6, 6),
        ["0", "2"],
    ),
    "attention": (
        lambda: nn.Sequential(SelfAttention(4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
        (3, 4),
        ["0.qkv", "3"],
    ),
}


def setup(kind: str) -> tuple[nn.Module, list[str], list[tuple[Tensor, Tensor]]]:
    """A float64 model, its profiled layers, and three batches of different sizes."""
    factory, sample_shape, names = MODELS[kind]
    model = factory().double()
    classes = model[-1].out_features
    batches = [
        (torch.randn(n, *sample_shape, dtype=torch.float64), torch.randint(0, classes, (n,)))
        for n in (4, 3, 5)
    ]
    return model, names, batches


def exact(model: nn.Module, names: list[str], batches: list) -> tuple[Tensor, Tensor]:
    """Gradient and Hessian of the loss on all samples at once w.r.t. the concatenated weights."""
    shapes = [model.get_submodule(name).weight.shape for name in names]
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])

    def loss(flat: Tensor) -> Tensor:
        chunks = flat.split([math.prod(shape) for shape in shapes])
        params = {
            f"{name}.weight": chunk.view(shape)
            for name, chunk, shape in zip(names, chunks, shapes, strict=True)
        }
        return F.cross_entropy(functional_call(model, params, (inputs,)), targets)

    flat = torch.cat([model.get_submodule(name).weight.detach().flatten() for name in names])
    training = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):  # the reference's own double backward
        gradient = torch.func.grad(loss)(flat)
        hessian = torch.autograd.functional.hessian(loss, flat)
    model.train(training)
    return gradient.detach(), hessian.detach()


def flatten(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])


def rel_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def blocks(model: nn.Module, names: list[str]) -> list[slice]:
    """Slices of each layer's weights in the concatenated vector."""
    out, start = [], 0
    for name in names:
        size = model.get_submodule(name).weight.numel()
        out.append(slice(start, start + size))
        start += size
    return out


def pairs(batches: list, criterion=F.cross_entropy) -> Data:
    """(inputs, targets) batches under the data contract, with `criterion(outputs, targets)`."""
    return Data(batches, supervised(criterion))

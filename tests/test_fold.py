import torch
from torch import nn

from allot.fold import find_conv_bn_pairs, fold_batchnorm, fold_structure


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 4, 1)
        self.bn1d = nn.BatchNorm1d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        z = self.bn1d(self.conv1d(y.flatten(2))).reshape_as(y)
        s = self.shared(z)  # used twice: not foldable
        return self.bn_shared(s) + s


def _randomise(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return model.eval()


def test_fold_keeps_outputs_and_skips_convs_with_other_users() -> None:
    model = _randomise(ConvBN())
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    pairs, note = find_conv_bn_pairs(model)
    assert note is None
    assert pairs == [("conv", "bn"), ("conv1d", "bn1d")]
    fold_batchnorm(model, pairs)
    assert isinstance(model.bn, nn.Identity) and model.conv.bias is not None
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_fold_structure_loads_a_folded_state_dict() -> None:
    folded = fold_batchnorm(_randomise(ConvBN()), [("conv", "bn")])
    rebuilt = fold_structure(ConvBN().eval(), [("conv", "bn")])
    rebuilt.load_state_dict(folded.state_dict())
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(rebuilt(x), folded(x))


def test_untraceable_model_is_not_folded_and_says_why() -> None:
    class Branchy(ConvBN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
                return self.bn(self.conv(x))
            return x

    pairs, note = find_conv_bn_pairs(Branchy())
    assert pairs == [] and "cannot be traced" in note

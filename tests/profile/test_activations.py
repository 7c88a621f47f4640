import pytest
import torch
from hessians import pairs
from torch import Tensor, nn

from allot.data import Data
from allot.discover import Layer, LayerSpec
from allot.errors import get_error_model
from allot.exceptions import ConfigError, DataError
from allot.profile.activations import damped_cholesky, input_statistics
from allot.profile.engine import Profile
from allot.stats import LayerStats

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
    stats = input_statistics(module, [Layer("", spec)], pairs(batches), progress=False)[""]
    delta = torch.randn(spec.weight_shape, dtype=torch.float64)
    data = Data(batches, lambda y, _batch: y.mean())
    profile = Profile(module, [Layer("", spec)], data, progress=False)
    predicted = get_error_model("output").damages({"": [delta]}, profile)[""][0]
    measured = sum(float(spec.forward(x, delta, None).pow(2).sum()) for x, _ in batches)
    positions = sum(spec.forward(x, delta, None).numel() // spec.out_features for x, _ in batches)
    assert stats.samples == positions
    assert predicted * stats.samples == pytest.approx(measured, rel=1e-9)


class _TokenModel(nn.Module):
    """Embedding then a Linear over every position, called like a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.proj(self.embed(input_ids)) * attention_mask[..., None]


def test_input_statistics_leave_padding_tokens_out() -> None:
    """Only the rows of real tokens count, so what sits at padded positions changes nothing."""
    torch.manual_seed(0)
    model = _TokenModel()
    layer = Layer("proj", LayerSpec.from_module(model.proj))
    ids = torch.randint(0, 10, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    repadded = torch.where(mask.bool(), ids, (ids + 1) % 10)
    stats, other = (
        input_statistics(
            model,
            [layer],
            pairs([({"input_ids": i, "attention_mask": mask}, mask)]),
            progress=False,
        )["proj"]
        for i in (ids, repadded)
    )
    rows = model.embed(ids)[mask.bool()].detach().double()
    assert stats.samples == other.samples == int(mask.sum())
    torch.testing.assert_close(stats.input_cov, rows.T @ rows)
    torch.testing.assert_close(other.input_cov, stats.input_cov)


def stats_of(x: Tensor) -> LayerStats:
    return LayerStats(input_cov=x.T @ x, samples=x.shape[0])


def second_moment(stats: LayerStats) -> Tensor:
    assert stats.input_cov is not None
    return stats.input_cov / stats.samples


def test_damped_cholesky_without_damping_factors_the_second_moment() -> None:
    stats = stats_of(torch.randn(50, 6, dtype=torch.float64) + 0.5)
    factor, lam = damped_cholesky(stats, damping=0.0)
    assert lam == 0.0
    assert torch.equal(factor, factor.tril())
    torch.testing.assert_close(factor @ factor.T, second_moment(stats), rtol=0, atol=1e-10)


def test_damped_cholesky_damps_a_rank_deficient_second_moment_until_it_factors() -> None:
    x = torch.randn(50, 5, dtype=torch.float64)
    stats = stats_of(torch.cat([x, x[:, :1]], dim=1))  # a duplicated input feature
    assert int(torch.linalg.cholesky_ex(second_moment(stats)).info) != 0
    factor, lam = damped_cholesky(stats, damping=0.0)
    scale = float(second_moment(stats).diagonal().mean())
    assert 1e-10 * scale <= lam <= 1e-5 * scale
    damped = second_moment(stats) + lam * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(factor @ factor.T, damped, rtol=0, atol=1e-10)


def test_damped_cholesky_damps_relative_to_the_mean_diagonal() -> None:
    stats = stats_of(3 * torch.randn(40, 4, dtype=torch.float64))
    factor, lam = damped_cholesky(stats, damping=1e-2)
    assert lam == 1e-2 * float(second_moment(stats).diagonal().mean())
    damped = second_moment(stats) + lam * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(factor @ factor.T, damped, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("stats", "message"),
    [
        (LayerStats(), "no input statistics"),
        (LayerStats(torch.eye(3, dtype=torch.float64), 0), "no input statistics"),
        (LayerStats(torch.zeros(3, 3, dtype=torch.float64), 10), "all zero"),
        (LayerStats(-torch.eye(3, dtype=torch.float64), 10), "all zero"),
        (LayerStats(torch.full((3, 3), float("nan"), dtype=torch.float64), 10), "NaN"),
        (LayerStats(torch.tensor([[3.0, 0.0], [0.0, -1.0]], dtype=torch.float64), 1), "tries"),
    ],
)
def test_damped_cholesky_rejects_unusable_statistics(stats: LayerStats, message: str) -> None:
    with pytest.raises(DataError, match=message):
        damped_cholesky(stats, damping=0.0, max_tries=3)


@pytest.mark.parametrize(("damping", "max_tries"), [(-1e-3, 6), (float("nan"), 6), (1e-2, 0)])
def test_damped_cholesky_rejects_bad_settings(damping: float, max_tries: int) -> None:
    stats = stats_of(torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(ConfigError):
        damped_cholesky(stats, damping, max_tries)

import pytest
import torch

from allot import Budget, compress
from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.methods import Method
from allot.modules.quant import GRIDS, QuantizedLayer, dequantize
from allot.profile.measure import mean_loss
from allot.refine import get_refiner
from allot.refine.feedback import feedback_target, refined_layers
from allot.schemes import Keep, LowRank, Quant
from allot.schemes.lowrank import svd_factors
from allot.schemes.steer import DAMPING
from allot.stats import LayerStats
from allot.zoo import create_model


def _moments(x_q: torch.Tensor, x_f: torch.Tensor) -> tuple[LayerStats, torch.Tensor]:
    return LayerStats(x_q.T @ x_q, x_q.shape[0]), x_f.T @ x_q


def test_target_is_the_float_weight_when_nothing_upstream_changed() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 6, dtype=torch.float64)
    weight = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(feedback_target(weight, *_moments(x, x)), weight)


def test_target_solves_the_ridge_least_squares_problem() -> None:
    """T minimises sum ||W x_f - T x_q||^2 + lam ||T - W||^2, checked against lstsq on the stacked
    system, with fewer rows than inputs so that the ridge term matters."""
    torch.manual_seed(1)
    x_f = torch.randn(5, 8, dtype=torch.float64)
    x_q = x_f + 0.3 * torch.randn(5, 8, dtype=torch.float64)
    weight = torch.randn(4, 8, dtype=torch.float64)
    stats, cross = _moments(x_q, x_f)
    lam = DAMPING * float(stats.input_cov.diagonal().mean())
    design = torch.cat([x_q, lam**0.5 * torch.eye(8, dtype=torch.float64)])
    wanted = torch.cat([x_f @ weight.T, lam**0.5 * weight.T])
    expected = torch.linalg.lstsq(design, wanted).solution.T
    torch.testing.assert_close(feedback_target(weight, stats, cross), expected)


def test_feedback_lowers_the_loss_of_a_steered_plan_and_stores_the_same(digits) -> None:
    def run(method: str):
        model = create_model("test-cnn")
        return compress(model, digits, method, Budget("bits", 2), progress=False)

    steered, refined = run("uniform-steered"), run("uniform-feedback")
    assert refined.plan.metadata["refine"] == {"name": "feedback", "settings": {}}
    assert "refine" not in steered.plan.metadata
    assert refined.plan.weight_bits == steered.plan.weight_bits
    assert refined_layers(refined.plan) == [layer.name for layer in refined.plan.layers]
    assert mean_loss(refined.model, digits) < mean_loss(steered.model, digits)


@pytest.mark.parametrize("grid", GRIDS)
def test_feedback_keeps_each_grid_family(digits, grid: str) -> None:
    def method(refine: str | None) -> Method:
        return Method(
            f"steered-{grid}",
            "2-bit steered on one grid",
            lambda layer: [Quant(2, None, "steered", grid), Keep()],
            error_model="output",
            allocator="uniform",
            refine=refine,
        )

    def run(refine: str | None):
        return compress(
            create_model("test-cnn"), digits, method(refine), Budget("bits", 2), progress=False
        )

    steered, refined = run(None), run("feedback")
    assert mean_loss(refined.model, digits) < mean_loss(steered.model, digits)
    for layer in refined.plan.layers:
        module = refined.model.get_submodule(layer.name)
        assert isinstance(module, QuantizedLayer) and module.grid == grid
        if grid != "float-offset":  # zero is still on every group's grid
            stored = module.quant_grid()
            assert bool((dequantize(stored.zero_points(), stored) == 0).all())


def test_only_steered_layers_are_refined(digits) -> None:
    plan = compress(
        create_model("test-cnn"), digits, "uniform-quant", Budget("bits", 4), progress=False
    ).plan
    assert refined_layers(plan) == []


def test_unknown_refinement_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown refinement"):
        get_refiner("polish")


def test_a_whitened_low_rank_refit_minimises_feedbacks_objective_over_its_rank() -> None:
    """sum ||W x_f - W~ x_q||^2 + lam ||W~ - W||^2 at the re-fitted rank-2 weight is below that of
    the plain truncation of the target and of the re-fit nudged in random directions."""
    torch.manual_seed(2)
    spec = LayerSpec("linear", 5, 8, bias=False)
    x_f = torch.randn(30, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    x_q = x_f + 0.2 * torch.randn(30, 8, dtype=torch.float64)
    weight = torch.randn(5, 8, dtype=torch.float64)
    stats, cross = _moments(x_q, x_f)
    lam = DAMPING * float(stats.input_cov.diagonal().mean())

    def objective(w: torch.Tensor) -> float:
        return float((x_f @ weight.T - x_q @ w.T).pow(2).sum() + lam * (w - weight).pow(2).sum())

    target = feedback_target(weight, stats, cross)
    refit = LowRank(2, "whitened").refit(target.float(), None, spec, stats)
    best = objective(refit.reconstruct().detach().double())
    u, v = svd_factors(target, 2)
    assert objective(u.double() @ v.double()) > best
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        nudged = (
            refit.u.detach().double() + 1e-3 * torch.randn(5, 2, generator=g, dtype=torch.float64)
        ) @ (refit.v.detach().double() + 1e-3 * torch.randn(2, 8, generator=g, dtype=torch.float64))
        assert objective(nudged) >= best * (1 - 1e-6)

"""Gradient and Hessian-vector products against torch.autograd on the full-data loss (float64)."""

import pytest
import torch
from hessians import MODELS, blocks, exact, flatten, pairs, rel_error, setup

from allot.exceptions import ConfigError, DataError
from allot.profile.hvp import Curvature


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gradient_equals_autograd_on_the_full_data_loss(kind: str) -> None:
    model, names, batches = setup(kind)
    gradient, _ = exact(model, names, batches)
    curvature = Curvature(model, names, pairs(batches))
    assert rel_error(flatten(list(curvature.gradient().values())), gradient) <= 1e-10


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_full_hvp_equals_the_exact_hessian_times_v(kind: str) -> None:
    model, names, batches = setup(kind)
    _, hessian = exact(model, names, batches)
    curvature = Curvature(model, names, pairs(batches))
    vectors = {name: torch.randn_like(model.get_submodule(name).weight) for name in names}
    hv = curvature.hvp(vectors)
    assert list(hv) == names
    assert rel_error(flatten(list(hv.values())), hessian @ flatten(list(vectors.values()))) <= 1e-6


def test_layers_absent_from_the_vectors_count_as_zero() -> None:
    model, names, batches = setup("mlp")
    _, hessian = exact(model, names, batches)
    first, second = blocks(model, names)
    v = torch.randn_like(model.get_submodule(names[1]).weight)
    hv = Curvature(model, names, pairs(batches)).hvp({names[1]: v})
    # Rows of the first layer hold the cross-layer block H_12 v, which is not zero.
    assert rel_error(hv[names[0]].flatten(), hessian[first, second] @ v.flatten()) <= 1e-6
    assert rel_error(hv[names[1]].flatten(), hessian[second, second] @ v.flatten()) <= 1e-6


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_layer_hvp_equals_the_exact_hessian_block_times_v(kind: str) -> None:
    model, names, batches = setup(kind)
    _, hessian = exact(model, names, batches)
    curvature = Curvature(model, names, pairs(batches))
    for name, block in zip(names, blocks(model, names), strict=True):
        v = torch.randn_like(model.get_submodule(name).weight)
        expected = hessian[block, block] @ v.flatten()
        assert rel_error(curvature.layer_hvp(name, v).flatten(), expected) <= 1e-6


def test_layer_hvps_equal_repeated_layer_hvp_and_cost_less() -> None:
    model, names, batches = setup("conv2d")
    curvature = Curvature(model, names, pairs(batches))
    vs = [torch.randn_like(model.get_submodule("0").weight) for _ in range(3)]
    together = curvature.layer_hvps("0", vs)
    assert curvature.passes.fb_equivalents == 1 + 3
    one_by_one = [curvature.layer_hvp("0", v) for v in vs]
    assert curvature.passes.fb_equivalents == 4 + 3 * 2
    for a, b in zip(together, one_by_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_block_hvps_equal_the_exact_diagonal_blocks_in_one_sweep(kind: str) -> None:
    model, names, batches = setup(kind)
    _, hessian = exact(model, names, batches)
    curvature = Curvature(model, names, pairs(batches))
    vectors = {
        name: [torch.randn_like(model.get_submodule(name).weight) for _ in range(k)]
        for name, k in zip(names, (2, 1), strict=True)
    }
    products = curvature.block_hvps(vectors)
    assert curvature.passes.gradient_sweeps == 1 and curvature.passes.second_backward_sweeps == 3
    for name, block in zip(names, blocks(model, names), strict=True):
        assert len(products[name]) == len(vectors[name])
        for v, hv in zip(vectors[name], products[name], strict=True):
            assert rel_error(hv.flatten(), hessian[block, block] @ v.flatten()) <= 1e-6


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_block_quadratics_are_the_exact_quadratic_forms_in_one_sweep(kind: str) -> None:
    model, names, batches = setup(kind)
    _, hessian = exact(model, names, batches)
    curvature = Curvature(model, names, pairs(batches))
    vectors = {
        name: [torch.randn_like(model.get_submodule(name).weight) for _ in range(k)]
        for name, k in zip(names, (2, 1), strict=True)
    }
    forms = curvature.block_quadratics(vectors)
    assert curvature.passes.gradient_sweeps == 1 and curvature.passes.second_backward_sweeps == 3
    for name, block in zip(names, blocks(model, names), strict=True):
        assert len(forms[name]) == len(vectors[name])
        for v, form in zip(vectors[name], forms[name], strict=True):
            expected = float(v.flatten() @ hessian[block, block] @ v.flatten())
            assert form == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert curvature.block_quadratics({names[0]: []}) == {names[0]: []}
    assert curvature.passes.second_backward_sweeps == 3


def test_block_hvps_of_no_vectors_cost_nothing() -> None:
    model, names, batches = setup("mlp")
    curvature = Curvature(model, names, pairs(batches))
    assert curvature.block_hvps({names[0]: []}) == {names[0]: []}
    assert curvature.passes.fb_equivalents == 0


def test_passes_count_sweeps_over_the_calibration_set() -> None:
    model, names, batches = setup("mlp")
    curvature = Curvature(model, names, pairs(batches))
    curvature.gradient()
    curvature.gradient()  # cached: no more work
    assert (curvature.passes.gradient_sweeps, curvature.passes.second_backward_sweeps) == (1, 0)
    curvature.hvp({"0": torch.ones(6, 5, dtype=torch.float64)})
    assert (curvature.passes.gradient_sweeps, curvature.passes.second_backward_sweeps) == (2, 1)
    assert curvature.passes.fb_equivalents == 3


def test_the_model_is_left_as_it_was() -> None:
    model, names, batches = setup("mlp")
    _, hessian = exact(model, names, batches)
    model.train()
    model[3].bias.requires_grad_(False)
    model[1].eval()  # mixed training flags must survive too
    before = {key: value.clone() for key, value in model.state_dict().items()}
    flags = {key: p.requires_grad for key, p in model.named_parameters()}
    modes = {key: m.training for key, m in model.named_modules()}
    curvature = Curvature(model, names, pairs(batches))
    v = {name: torch.randn_like(model.get_submodule(name).weight) for name in names}
    with torch.no_grad():  # the caller's grad mode does not matter
        hv = curvature.hvp(v)
        curvature.gradient()
        curvature.layer_hvps("0", [v["0"]])
    # Dropout was off during profiling although the model is in training mode.
    assert rel_error(flatten(list(hv.values())), hessian @ flatten(list(v.values()))) <= 1e-6
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert {key: p.requires_grad for key, p in model.named_parameters()} == flags
    assert {key: m.training for key, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_bad_arguments_raise_clear_errors() -> None:
    model, names, batches = setup("mlp")
    with pytest.raises(DataError):
        Curvature(model, names, pairs([]))
    with pytest.raises(ConfigError, match="not a module"):
        Curvature(model, ["9"], pairs(batches))
    curvature = Curvature(model, names, pairs(batches))
    with pytest.raises(ConfigError, match="not profiled"):
        curvature.layer_hvp("1", torch.zeros(6, 5, dtype=torch.float64))
    with pytest.raises(ConfigError, match="does not fit"):
        curvature.layer_hvp("0", torch.zeros(5, 6, dtype=torch.float64))

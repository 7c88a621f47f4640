import pytest
import torch

from allot import Budget, apply, compress, compress_scored, score
from allot.evaluate import file_bytes, metrics
from allot.exceptions import BudgetError, DataError
from allot.methods import Method
from allot.methods.cet import cet_grid
from allot.profile.measure import mean_loss
from allot.schemes import Keep, Quant
from allot.zoo import create_model, get_dataset


def _run(method: str, budget: Budget, dataset, name: str = "test-cnn"):
    return compress(create_model(name), dataset, method, budget, model_name=name, progress=False)


def test_uniform_4_bit_quantizes_every_layer_and_stays_accurate(digits) -> None:
    model = create_model("test-cnn")
    result = _run("uniform-quant", Budget("bits", 4), digits)
    assert {layer.scheme for layer in result.plan.layers} == {Quant(4)}
    assert result.plan.folded  # test-cnn's BatchNorm is folded into its conv
    before, after = metrics(model, digits)["accuracy"], metrics(result.model, digits)["accuracy"]
    assert after >= before - 0.05
    assert file_bytes(result.model) < file_bytes(model) / 2  # tiny model: headers weigh a lot


def test_input_model_is_not_modified(digits) -> None:
    model = create_model("test-cnn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _ = compress(model, digits, "uniform-quant", Budget("bits", 2), progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_same_seed_same_plan(digits) -> None:
    first = _run("output-error-quant", Budget("ratio", 10), digits).plan.dumps()
    assert _run("output-error-quant", Budget("ratio", 10), digits).plan.dumps() == first


def test_lossless_plan_does_not_raise_the_mean_loss(digits) -> None:
    result = _run("uniform-quant", Budget("lossless"), digits)
    reference = result.plan.metadata["lossless"]["float_calibration_loss"]
    assert mean_loss(result.model, digits) <= reference
    assert result.plan.ratio > 1  # test-cnn tolerates 8 bits at least


def test_bytes_budget_counts_the_float_parameters_too(digits) -> None:
    full = _run("uniform-quant", Budget("bits", 8), digits)
    other = file_bytes(full.model)  # a generous byte budget that 8 bits fits
    result = _run("output-error-quant", Budget("bytes", other), digits)
    kept_float = sum(t.numel() * 4 for k, t in result.model.state_dict().items() if "bias" in k)
    assert result.plan.weight_bits / 8 + kept_float <= other


def test_out_of_reach_budget_says_what_is_reachable(digits) -> None:
    with pytest.raises(BudgetError, match=r"ratio 500x is out of reach.*smallest plan is ratio"):
        _run("uniform-quant", Budget("ratio", 500), digits)


def test_data_that_does_not_fit_the_model_is_refused() -> None:
    with pytest.raises(
        DataError, match=r"cannot run on the calibration data \(inputs \(64, 1, 40\)\)"
    ):
        _run("uniform-quant", Budget("bits", 4), get_dataset("mnist1d", 64))


def test_ratio_one_keeps_every_layer_in_float(digits) -> None:
    result = _run("uniform-quant", Budget("ratio", 1.0), digits)
    assert {layer.scheme for layer in result.plan.layers} == {Keep()}


def test_a_damage_limit_gives_the_smallest_plan_predicted_within_it(digits) -> None:
    loose, tight = (_run("cet", Budget("damage", limit), digits).plan for limit in (1e-2, 1e-4))
    assert loose.damage <= 1e-2 and tight.damage <= 1e-4
    assert loose.weight_bits < tight.weight_bits  # a tighter limit costs bits


@pytest.mark.parametrize("error_model", ["curvature", "second-order"])
def test_cet_lossless_keeps_the_mean_loss(digits, error_model) -> None:
    # Under second-order the search starts from the plan predicted not to raise the loss.
    method = Method("cet-test", "cet", cet_grid, error_model=error_model)
    result = compress(create_model("test-cnn"), digits, method, Budget("lossless"), progress=False)
    reference = result.plan.metadata["lossless"]["float_calibration_loss"]
    assert mean_loss(result.model, digits) <= reference
    assert result.plan.ratio > 4  # test-cnn loses nothing at mixed 1..8 bits on average


def test_cet_plans_are_deterministic_and_steering_changes_only_the_codes(digits) -> None:
    first = _run("cet", Budget("ratio", 10), digits).plan
    assert _run("cet", Budget("ratio", 10), digits).plan.dumps() == first.dumps()
    steered = _run("uniform-steered", Budget("bits", 3), digits)
    nearest = _run("uniform-quant", Budget("bits", 3), digits)
    assert steered.plan.weight_bits == nearest.plan.weight_bits
    assert {layer.scheme.label() for layer in steered.plan.layers} == {"quant3-steered"}
    assert mean_loss(steered.model, digits) < mean_loss(nearest.model, digits)


def test_applying_a_scored_plan_reuses_the_fitted_candidates(digits, monkeypatch) -> None:
    """compress_scored applies the modules scoring fitted: nothing is fitted again, and the model
    equals the plan applied from scratch to the float model."""
    model = create_model("test-cnn")
    scored = score(model, digits, "cet-steer", model_name="test-cnn", progress=False)

    def refit(*_args: object) -> None:
        raise AssertionError("a scheme was fitted again")

    with monkeypatch.context() as patch:
        patch.setattr(Quant, "compress", refit)
        result = compress_scored(scored, Budget("ratio", 6))
    fresh = apply(create_model("test-cnn"), result.plan, scored.profile)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], tensor), name
    second = compress_scored(scored, Budget("ratio", 6)).model
    assert all(a is not b for a, b in zip(second.modules(), result.model.modules(), strict=True))

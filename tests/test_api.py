import pytest
import torch

from allot import Budget, compress
from allot.evaluate import calibration_loss, file_bytes, metrics
from allot.exceptions import BudgetError, DataError
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


def test_lossless_plan_does_not_raise_the_calibration_loss(digits) -> None:
    result = _run("uniform-quant", Budget("lossless"), digits)
    reference = result.plan.metadata["lossless"]["float_calibration_loss"]
    assert calibration_loss(result.model, digits) <= reference
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
    with pytest.raises(DataError, match="cannot run on data set 'mnist1d'"):
        _run("uniform-quant", Budget("bits", 4), get_dataset("mnist1d", 64))


def test_ratio_one_keeps_every_layer_in_float(digits) -> None:
    result = _run("uniform-quant", Budget("ratio", 1.0), digits)
    assert {layer.scheme for layer in result.plan.layers} == {Keep()}

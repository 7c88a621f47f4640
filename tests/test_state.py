"""Matching a stored state dict to a model: allot/state.py."""

import pytest
import torch
from torch import nn

from allot.exceptions import ArtifactError, ModelError
from allot.state import matched_state, tied_names


def tied_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    model[2].weight = model[0].weight
    return model


def test_tied_names_group_exactly_the_shared_tensors() -> None:
    tied = tied_names(tied_model())
    assert tied["0.weight"] == tied["2.weight"] == ["0.weight", "2.weight"]
    assert tied["0.bias"] == ["0.bias"] and tied["3.weight"] == ["3.weight"]


def test_a_tied_tensor_stored_once_fills_every_name() -> None:
    source, target = tied_model(), tied_model()
    stored = {k: v.clone() + 1 for k, v in source.state_dict().items() if k != "2.weight"}
    target.load_state_dict(matched_state(target, stored, "the weights", ModelError, False))
    assert torch.equal(target[2].weight, stored["0.weight"])
    assert target[2].weight is target[0].weight  # still tied


def test_tied_names_stored_with_different_values_are_refused() -> None:
    model = tied_model()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    stored["2.weight"] = stored["2.weight"] + 1
    with pytest.raises(ModelError, match=r"different values under 0\.weight, 2\.weight"):
        matched_state(model, stored, "the weights", ModelError, False)


@pytest.mark.parametrize(
    ("edit", "exact", "message"),
    [
        (lambda s: s.pop("3.bias"), False, "missing 3.bias"),
        (lambda s: s.update(extra=torch.zeros(1)), False, "unexpected extra"),
        (lambda s: s.update({"3.bias": torch.zeros(3)}), False, r"3.bias has shape \(3,\)"),
        (lambda s: s.update({"3.bias": torch.zeros(2).long()}), False, "3.bias is torch.int64"),
        (lambda s: s.update({"3.bias": torch.zeros(2).double()}), True, "3.bias is torch.float64"),
    ],
)
def test_what_does_not_fit_is_named_in_one_line(edit, exact, message) -> None:
    model = tied_model()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    edit(stored)
    with pytest.raises(ArtifactError, match=message) as caught:
        matched_state(model, stored, "the tensors in F", ArtifactError, exact)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("the tensors in F do not match the model: ")


def test_float_weights_of_another_float_dtype_are_cast_for_a_users_model() -> None:
    model = tied_model()
    stored = {k: v.double() for k, v in model.state_dict().items()}
    model.load_state_dict(matched_state(model, stored, "the weights", ModelError, False))
    assert model[3].weight.dtype == torch.float32


def test_names_from_the_file_cannot_break_the_line() -> None:
    model = tied_model()
    stored = {**{k: v.clone() for k, v in model.state_dict().items()}, "evil\nname": torch.ones(1)}
    with pytest.raises(ArtifactError) as caught:
        matched_state(model, stored, "the tensors in F", ArtifactError, True)
    assert "\n" not in str(caught.value) and "'evil\\nname'" in str(caught.value)

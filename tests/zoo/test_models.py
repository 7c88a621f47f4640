"""Zoo models: every registered architecture builds and maps its data set's inputs to outputs of
the right shape (logits for classifiers), and every shipped checkpoint loads and still scores what
its sidecar records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from allot.data import forward
from allot.exceptions import ModelError
from allot.zoo import MODELS, create_model, get_dataset, get_entry
from allot.zoo import registry as zoo_registry
from allot.zoo.tasks import ClassificationTask

# minilm's data set embeds 4,000 sentences with the full model (a minute): tests/zoo/test_minilm.py
# covers it.
NAMES = sorted(name for name in MODELS if name != "minilm")
TRAINED = [name for name in NAMES if MODELS[name].recipe is not None]

# Test accuracy every shipped checkpoint must reach (chance is 0.1 on all three data sets).
ACCURACY_FLOOR = {
    "digits-cnn": 0.96,
    "mnist-resnet20": 0.97,
    "mnist1d-cnn": 0.87,
    "test-cnn": 0.8,
    "test-mlp": 0.8,
    "test-conv1d": 0.4,
}


def test_the_zoo_is_registered() -> None:
    assert set(ACCURACY_FLOOR) <= set(NAMES)
    assert set(TRAINED) == set(ACCURACY_FLOOR), "give every trained model an accuracy floor"


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_maps_example_inputs_to_outputs(name: str) -> None:
    entry = get_entry(name)
    dataset = get_dataset(entry.dataset)
    if isinstance(dataset.task, ClassificationTask):
        expected = (5, int(dataset.train.targets.max()) + 1)  # logits
    else:
        expected = (5, *dataset.train.targets.shape[1:])  # reference outputs
    model = create_model(name, pretrained=False)
    assert not model.training
    with torch.no_grad():
        outputs = forward(model, dataset.example_inputs(5))
    assert outputs.shape == expected
    assert torch.isfinite(outputs).all()


@pytest.mark.parametrize("name", TRAINED)
def test_shipped_checkpoint_reproduces_its_recorded_accuracy(name: str) -> None:
    entry = get_entry(name)
    sidecar = json.loads(entry.checkpoint.with_suffix(".json").read_text())
    assert sidecar["model"] == name
    assert sidecar["dataset"] == entry.dataset
    dataset = get_dataset(entry.dataset)
    metrics = dataset.task.evaluate(create_model(name), dataset, "test")
    assert metrics["accuracy"] >= ACCURACY_FLOOR[name]
    # A changed split, preprocessing or architecture shows up as a different score.
    assert metrics["accuracy"] == pytest.approx(sidecar["metrics"]["accuracy"], abs=0.002)


@pytest.mark.parametrize("name", TRAINED)
def test_checkpoint_weights_differ_from_initialisation(name: str) -> None:
    trained = create_model(name).state_dict()
    fresh = create_model(name, pretrained=False).state_dict()
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[key], fresh[key]) for key in trained)


def test_resnet20_architecture() -> None:
    model = create_model("mnist-resnet20", pretrained=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # stem + 9 blocks x 2 convs + 2 projection shortcuts; one linear head
    assert len(convs) == 21
    assert len(linears) == 1
    assert convs[0].in_channels == 1
    assert sum(p.numel() for p in model.parameters()) == 272_186
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21


def test_test_mlp_is_linear_only() -> None:
    model = create_model("test-mlp", pretrained=False)
    weighted = {type(m) for m in model.modules() if getattr(m, "weight", None) is not None}
    assert weighted == {nn.Linear}


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ModelError, match="no-such-model") as error:
        create_model("no-such-model")
    assert "mnist-resnet20" in str(error.value)
    assert "test-cnn" in str(error.value)


def test_missing_checkpoint_says_how_to_make_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(zoo_registry, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(ModelError, match="allot zoo train test-cnn"):
        create_model("test-cnn")

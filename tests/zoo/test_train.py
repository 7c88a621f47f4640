"""Training zoo models from their recipes, and writing checkpoints atomically."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from allot.exceptions import ConfigError, ModelError
from allot.zoo import MODELS, ZooModel, create_model, get_dataset
from allot.zoo import train as zoo_train
from allot.zoo.train import save_checkpoint, train_model


def with_recipe(monkeypatch: pytest.MonkeyPatch, name: str, **changes: object) -> None:
    """Replace fields of a registered model's recipe for the duration of a test."""
    entry = MODELS[name]
    recipe = dataclasses.replace(entry.recipe, **changes)
    monkeypatch.setitem(MODELS, name, dataclasses.replace(entry, recipe=recipe))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[key], sb[key]) for key in sa)


@pytest.mark.parametrize("name", ["test-mlp", "test-cnn"])
def test_same_seed_gives_identical_weights(name: str) -> None:
    torch.manual_seed(1)  # the recipe's seed must win over whatever the global state is
    first, first_metrics = train_model(name, epochs=1, progress=False)
    torch.manual_seed(2)
    second, second_metrics = train_model(name, epochs=1, progress=False)
    assert_same_weights(first, second)
    assert first_metrics["accuracy"] == second_metrics["accuracy"]


def test_seed_changes_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    baseline, _ = train_model("test-mlp", epochs=1, progress=False)
    with_recipe(monkeypatch, "test-mlp", seed=1)
    reseeded, _ = train_model("test-mlp", epochs=1, progress=False)
    assert differs(baseline, reseeded)


def test_training_learns_and_reports_test_metrics() -> None:
    torch.manual_seed(0)
    untrained = create_model("test-cnn", pretrained=False)
    model, metrics = train_model("test-cnn", progress=False)
    assert not model.training
    assert differs(model, untrained)
    assert {"accuracy", "loss", "epochs"} <= set(metrics)
    assert metrics["epochs"] == MODELS["test-cnn"].recipe.epochs
    dataset = get_dataset("digits")
    assert metrics["accuracy"] == dataset.task.evaluate(model, dataset)["accuracy"]
    assert metrics["accuracy"] > 0.5  # chance is 0.1


def test_sgd_recipe_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    with_recipe(monkeypatch, "test-mlp", optimizer="sgd", lr=0.1, weight_decay=1e-4)
    _, metrics = train_model("test-mlp", epochs=2, progress=False)
    assert metrics["accuracy"] > 0.5
    assert metrics["epochs"] == 2


def test_unknown_optimizer_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with_recipe(monkeypatch, "test-mlp", optimizer="lbfgs")
    with pytest.raises(ConfigError, match="lbfgs"):
        train_model("test-mlp", progress=False)


def test_epochs_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="epochs"):
        train_model("test-mlp", epochs=0, progress=False)


def test_model_without_recipe_cannot_be_trained(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = ZooModel("no-recipe", MODELS["test-mlp"].build, "digits")
    monkeypatch.setitem(MODELS, "no-recipe", entry)
    with pytest.raises(ModelError, match="no training recipe"):
        train_model("no-recipe", progress=False)
    with pytest.raises(ModelError, match="unknown zoo model"):
        train_model("no-such-model", progress=False)


def test_progress_bar_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    train_model("test-mlp", epochs=1, progress=True)
    assert "train test-mlp" in capsys.readouterr().out


def test_save_checkpoint_round_trip(tmp_path: Path) -> None:
    model = create_model("test-cnn")
    metrics = {"accuracy": 0.93, "loss": 0.25}
    path = save_checkpoint("test-cnn", model, metrics, directory=tmp_path)
    assert path == tmp_path / "test-cnn.safetensors"
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tmp_path.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test-cnn.json", "test-cnn.safetensors"]

    state = load_file(path)
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    for key in state:
        torch.testing.assert_close(state[key], reference[key], rtol=0, atol=0)

    info = json.loads((tmp_path / "test-cnn.json").read_text())
    assert info["metrics"] == metrics
    assert info["recipe"] == dataclasses.asdict(MODELS["test-cnn"].recipe)
    assert info["dataset"] == "digits"
    assert info["torch"] == torch.__version__


def test_save_checkpoint_failure_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = create_model("test-mlp")
    save_checkpoint("test-mlp", model, {"accuracy": 0.9}, directory=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash_midway(tensors: dict[str, torch.Tensor], filename: str) -> None:
        Path(filename).write_bytes(b"truncated")
        raise OSError("disk full")

    monkeypatch.setattr(zoo_train, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint("test-mlp", model, {"accuracy": 0.5}, directory=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()

    # The sidecar failing (metrics JSON cannot encode) must not replace the weights either.
    torch.nn.init.zeros_(model[1].weight)
    with pytest.raises(TypeError):
        save_checkpoint("test-mlp", model, {"accuracy": object()}, directory=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

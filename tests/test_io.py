import pickle

import pytest
import torch

from allot import Budget, compress, load, save
from allot.exceptions import ArtifactError
from allot.io import PLAN, WEIGHTS, atomic_write
from allot.zoo import create_model, get_dataset


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, digits):
    result = compress(
        create_model("test-cnn"),
        digits,
        "uniform-quant",
        Budget("bits", 4),
        model_name="test-cnn",
        progress=False,
    )
    directory = save(result.model, result.plan, tmp_path_factory.mktemp("art"))
    return result, directory


def test_reload_gives_identical_outputs_without_the_original_weights(artifact, digits) -> None:
    result, directory = artifact
    model, plan = load(
        directory
    )  # rebuilt from the zoo architecture, random init, then the artifact
    x = digits.example_inputs(16)
    assert torch.equal(model(x), result.model(x))
    assert plan.dumps() == result.plan.dumps()


def test_artifact_file_shrinks_by_the_reported_ratio(artifact) -> None:
    result, directory = artifact
    stored = sum(t.numel() * t.element_size() for k, t in result.model.state_dict().items())
    size = (directory / WEIGHTS).stat().st_size
    assert stored <= size < stored + 16_384  # the rest is the safetensors header
    assert result.plan.weight_bits // 8 <= stored


def test_corrupt_or_truncated_weights_are_detected(artifact, tmp_path) -> None:
    _result, directory = artifact
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / PLAN).write_bytes((directory / PLAN).read_bytes())
    (broken / WEIGHTS).write_bytes((directory / WEIGHTS).read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="truncated, corrupt or replaced"):
        load(broken)
    (broken / WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load(broken)
    with pytest.raises(ArtifactError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_a_pickle_is_never_unpickled(artifact, tmp_path) -> None:
    _result, directory = artifact
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / PLAN).write_bytes((directory / PLAN).read_bytes())
    (evil / WEIGHTS).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ArtifactError):
        load(evil)
    assert not marker.exists()


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch) -> None:
    target = tmp_path / "f.txt"
    atomic_write(target, b"old")

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_resnet20_4_bit_artifact_is_at_most_a_seventh_of_float(tmp_path) -> None:
    """Acceptance of the foundation: measured bytes on disk, and an exact reload."""
    from allot.evaluate import file_bytes

    dataset = get_dataset("mnist5k", calibration_size=64)
    model = create_model("mnist-resnet20")
    result = compress(
        model,
        dataset,
        "uniform-quant",
        Budget("bits", 4),
        progress=False,
        model_name="mnist-resnet20",
    )
    directory = save(result.model, result.plan, tmp_path / "rn20")
    assert (directory / WEIGHTS).stat().st_size <= file_bytes(model) / 7
    reloaded, _plan = load(directory)
    x = dataset.example_inputs(8)
    assert torch.equal(reloaded(x), result.model(x))


def test_saving_over_an_artifact_replaces_it_whole(artifact, tmp_path) -> None:
    """A new artifact never sits beside the old one's evaluation or report: those were made for
    the old plan, so they go with it."""
    import shutil

    result, directory = artifact
    target = tmp_path / "art"
    shutil.copytree(directory, target)
    (target / "evaluation.json").write_text('{"compressed": {"ratio": 99.0}}')
    (target / "report.md").write_text("old report")
    save(result.model, result.plan, target)
    assert sorted(p.name for p in target.iterdir()) == [WEIGHTS, PLAN]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    load(target)


def test_saving_where_the_users_files_are_is_refused(artifact, tmp_path) -> None:
    result, _ = artifact
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds files allot does not write"):
        save(result.model, result.plan, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"

"""--device: the model and every batch on the named device, one clear error for one that is not
here, and (where CUDA is) a compress end to end on the GPU with the CPU's plan."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from allot.cli import main
from allot.data import Data, OnDevice, on_device, supervised, to_device
from allot.io import PLAN

CUDA = torch.cuda.is_available()


def _compress(tmp_path, capsys, name: str, *device: str) -> tuple[int, str, dict | None]:
    out = tmp_path / name
    code = main(
        [
            *("--no-progress", "compress", "test-cnn", "--method", "cet-steer", "--ratio", "8"),
            *("--calibration", "64", "--out", str(out), "--no-cache", *device),
        ]
    )
    _, err = capsys.readouterr()
    plan = json.loads((out / PLAN).read_text()) if code == 0 else None
    return code, err, plan


def test_device_cpu_is_the_default(tmp_path, capsys) -> None:
    code, _, default = _compress(tmp_path, capsys, "default")
    assert code == 0
    code, _, cpu = _compress(tmp_path, capsys, "cpu", "--device", "cpu")
    assert code == 0
    assert cpu is not None and default is not None
    assert cpu["layers"] == default["layers"]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        pytest.param(
            "cuda",
            "--device cuda: this torch has no CUDA device",
            marks=pytest.mark.skipif(CUDA, reason="CUDA is here"),
        ),
        ("cuda:99", "--device cuda:99"),
        ("gpu", "--device 'gpu' is not a device"),
        ("xla", "--device xla: allot runs on cpu, cuda or mps"),
    ],
)
def test_a_device_that_is_not_here_is_one_error_naming_the_flag(
    tmp_path, capsys, device: str, message: str
) -> None:
    code, err, _ = _compress(tmp_path, capsys, "out", "--device", device)
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_batches_move_to_the_device_as_they_are_read() -> None:
    """On the meta device (no values, but a device of its own): calibration and training
    batches move, nested structures included; sized collections stay sized."""
    pairs = [(torch.ones(2, 3), torch.zeros(2, dtype=torch.int64))]
    data = Data(pairs, supervised(F.cross_entropy), train=Reiterable(pairs))
    moved = on_device(data, torch.device("meta"))
    (inputs, targets), *_ = moved.calibration
    assert inputs.device.type == targets.device.type == "meta"
    assert moved.batch_count() == 1
    assert moved.train is not None and not hasattr(moved.train, "__len__")
    assert next(iter(moved.train))[0].device.type == "meta"
    assert on_device(data, torch.device("cpu")) is data
    nested = to_device({"a": [torch.ones(1)], "b": 3}, torch.device("meta"))
    assert nested["a"][0].device.type == "meta" and nested["b"] == 3
    assert isinstance(moved.calibration, OnDevice)


class Reiterable:
    """A re-iterable collection that does not know its length."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_compress_on_cuda_chooses_the_cpu_plan(tmp_path, capsys) -> None:
    code, err, cuda = _compress(tmp_path, capsys, "cuda", "--device", "cuda")
    assert code == 0, err
    code, _, cpu = _compress(tmp_path, capsys, "cpu", "--device", "cpu")
    assert cuda is not None and cpu is not None
    assert [layer["label"] for layer in cuda["layers"]] == [
        layer["label"] for layer in cpu["layers"]
    ]
    assert main(["--no-progress", "evaluate", str(tmp_path / "cuda"), "--device", "cuda"]) == 0

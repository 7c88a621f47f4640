"""The AIMET peers (AdaRound, round-to-nearest, AMP) on the tiny zoo models: storage counted from
AIMET's own quantizers, weights on AIMET's grid, and the behaviour each technique promises."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peers import aimet as adapter
from peers.base import PeerRun, Setting, packed_bits, ratio, tensor_bits
from torch import nn

from allot.api import prepare
from allot.exceptions import ConfigError
from allot.zoo import create_model, get_dataset, get_entry
from allot.zoo.data import Dataset

_REASON = adapter.PEERS[0].unavailable()
if _REASON is not None:
    pytest.skip(f"AIMET cannot run here: {_REASON}", allow_module_level=True)

PEERS = {peer.name: peer for peer in adapter.PEERS}
CALIBRATION = 128
ITERATIONS = 500  # AdaRound per layer; AIMET's default is 15000 below 8 bits


class Case:
    """A folded tiny zoo model, its layers and data, and the peer runs made on it (cached)."""

    def __init__(self, name: str) -> None:
        self.model, _, discovery, _ = prepare(create_model(name))
        self.layers = discovery.layers
        self.dataset: Dataset = get_dataset(
            get_entry(name).dataset, calibration_size=CALIBRATION, seed=0
        )
        self.runs: dict[tuple[str, tuple[tuple[str, object], ...]], tuple[PeerRun, Any]] = {}

    def run(self, peer: str, **options: object) -> tuple[PeerRun, Any]:
        """The peer's run and the AIMET quantsim its stored bits and weights were read from."""
        key = (peer, tuple(sorted(options.items())))
        if key not in self.runs:
            sims: list[Any] = []
            harvest = adapter._harvest

            def spy(sim: Any, model: nn.Module, layers: list) -> Any:
                sims.append(sim)
                return harvest(sim, model, layers)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(adapter, "_harvest", spy)
                result = PEERS[peer].run(
                    self.model, self.dataset, self.layers, Setting(peer, options)
                )
            self.runs[key] = (result, sims[0])
        return self.runs[key]

    def accuracy(self, model: nn.Module, split: str = "test") -> float:
        return self.dataset.task.evaluate(model, self.dataset, split)["accuracy"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """AdaRound's many tiny steps run fastest on one thread (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cnn() -> Case:
    return Case("test-cnn")


@pytest.fixture(scope="module")
def conv1d() -> Case:
    return Case("test-conv1d")


def weight_quantizer(sim: Any, name: str) -> Any:
    return sim.model.get_submodule(name).param_quantizers["weight"]


def layer_io(
    model: nn.Module, name: str, inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of layer `name` when `model` runs on `inputs`."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["input"], seen["output"] = args[0], output

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    return seen["input"], seen["output"]


def test_available_with_version() -> None:
    for peer in adapter.PEERS:
        assert peer.unavailable() is None
        assert peer.targets == "conv"
        assert peer.version() == importlib.metadata.version("aimet-torch")


def test_settings() -> None:
    for name in ("aimet-rtn", "aimet-adaround"):
        settings = PEERS[name].settings()
        assert [s.options["bits"] for s in settings] == [2, 3, 4, 8]
        assert len({s.label for s in settings}) == 4
    (amp,) = PEERS["aimet-amp"].settings()
    assert "calibration" in amp.label and amp.options == {}
    assert adapter.AMP_OPTIONS["candidates"] == (2, 4, 8)
    assert adapter.AMP_OPTIONS["drop"] == 0.01


def test_module_import_does_not_import_aimet() -> None:
    code = "import sys, peers.aimet; print('aimet_torch' in sys.modules)"
    bench = Path(__file__).parents[2]  # where `peers` is importable from, as for the scripts
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=bench
    )
    assert out.stdout.strip() == "False"


def test_torchvision_operators_declared_once() -> None:
    adapter._declare_torchvision_ops()
    adapter._declare_torchvision_ops()
    assert len(adapter._TORCHVISION_STUB) <= 1
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")


@pytest.mark.parametrize(
    ("peer", "options"),
    [
        ("aimet-rtn", {"bits": 2}),
        ("aimet-rtn", {"bits": 3, "scheme": "tf"}),
        ("aimet-adaround", {"bits": 2, "iterations": ITERATIONS}),
        ("aimet-amp", {}),
    ],
)
def test_stored_bits_are_the_quantizers_tensors(cnn: Case, peer: str, options: dict) -> None:
    run, sim = cnn.run(peer, **options)
    assert set(run.stored_bits) == {layer.name for layer in cnn.layers}
    for name, bits in run.stored_bits.items():
        quantizer = weight_quantizer(sim, name)
        weight = cnn.model.get_submodule(name).weight
        assert quantizer.qmax - quantizer.qmin + 1 == 2**quantizer.bitwidth
        held = sum(tensor_bits(p) for p in quantizer.parameters())  # min and max, per channel
        assert held == 2 * 32 * weight.shape[0]
        assert bits == packed_bits(weight.numel(), quantizer.bitwidth) + held


@pytest.mark.parametrize(
    ("peer", "options"),
    [
        ("aimet-rtn", {"bits": 2}),
        ("aimet-rtn", {"bits": 4}),
        ("aimet-adaround", {"bits": 2, "iterations": ITERATIONS}),
        ("aimet-amp", {}),
    ],
)
def test_weights_lie_on_aimet_grid(cnn: Case, peer: str, options: dict) -> None:
    run, sim = cnn.run(peer, **options)
    for layer in cnn.layers:
        quantizer = weight_quantizer(sim, layer.name)
        scale, offset = quantizer.get_scale().detach(), quantizer.get_offset().detach()
        weight = run.model.get_submodule(layer.name).weight.detach()
        codes = torch.round(weight / scale - offset)
        assert codes.min() >= quantizer.qmin and codes.max() <= quantizer.qmax
        torch.testing.assert_close(weight, scale * (codes + offset), rtol=1e-6, atol=0.0)
        per_channel = [row.unique().numel() for row in weight.reshape(weight.shape[0], -1)]
        assert max(per_channel) <= 2**quantizer.bitwidth


def test_returned_model_is_plain_and_input_untouched(cnn: Case) -> None:
    before = {k: v.clone() for k, v in cnn.model.state_dict().items()}
    run, sim = cnn.run("aimet-rtn", bits=2)
    assert [type(m) for m in run.model.modules()] == [type(m) for m in cnn.model.modules()]
    for key, value in cnn.model.state_dict().items():
        assert torch.equal(value, before[key])
    inputs = cnn.dataset.calibration.inputs
    with torch.no_grad(), adapter._quiet_aimet():
        assert torch.equal(run.model(inputs), sim.model(inputs))


def test_rtn_8_bits_close_to_float(cnn: Case) -> None:
    run, _ = cnn.run("aimet-rtn", bits=8)
    assert abs(cnn.accuracy(run.model) - cnn.accuracy(cnn.model)) <= 0.01
    weights = [cnn.model.get_submodule(layer.name).weight for layer in cnn.layers]
    stored = sum(8 * w.numel() + 64 * w.shape[0] for w in weights)
    expected = 32 * sum(w.numel() for w in weights) / stored
    assert ratio(cnn.model, cnn.layers, run.stored_bits) == pytest.approx(expected)


def test_rtn_grid_named(cnn: Case) -> None:
    run, _ = cnn.run("aimet-rtn", bits=2)
    assert "per-channel" in run.grid and "tf_enhanced" in run.grid
    assert "-2..1" in run.grid and "round-to-nearest" in run.grid
    tf_run, _ = cnn.run("aimet-rtn", bits=3, scheme="tf")
    assert "min-max" in tf_run.grid and "-2..1" not in tf_run.grid


def test_adaround_beats_rtn_on_its_layer(conv1d: Case) -> None:
    """On test-conv1d AdaRound can only take the Linear layer (AIMET's AdaRound skips Conv1d,
    which it rounds to nearest like RTN), so that layer sees the same inputs in both models."""
    ada, _ = conv1d.run("aimet-adaround", bits=2, iterations=ITERATIONS)
    rtn, _ = conv1d.run("aimet-rtn", bits=2)
    convs = [layer.name for layer in conv1d.layers if layer.spec.kind.startswith("conv")]
    (linear,) = [layer.name for layer in conv1d.layers if layer.name not in convs]
    for name in convs:
        assert torch.equal(
            ada.model.get_submodule(name).weight, rtn.model.get_submodule(name).weight
        )
    (note,) = [note for note in ada.notes if "rounded to nearest" in note]
    assert all(name in note for name in convs) and linear not in note.split(": ")[-1].split(", ")
    inputs = conv1d.dataset.calibration.inputs
    _, target = layer_io(conv1d.model, linear, inputs)
    ada_in, ada_out = layer_io(ada.model, linear, inputs)
    rtn_in, rtn_out = layer_io(rtn.model, linear, inputs)
    assert torch.equal(ada_in, rtn_in)
    ada_error = (ada_out - target).pow(2).mean()
    rtn_error = (rtn_out - target).pow(2).mean()
    assert ada_error <= rtn_error
    assert not torch.equal(
        ada.model.get_submodule(linear).weight, rtn.model.get_submodule(linear).weight
    )


def test_adaround_keeps_rtn_grid_and_moves_codes_by_one(cnn: Case) -> None:
    ada, ada_sim = cnn.run("aimet-adaround", bits=2, iterations=ITERATIONS)
    rtn, rtn_sim = cnn.run("aimet-rtn", bits=2)
    assert "AdaRound" in ada.grid
    assert any(f"{ITERATIONS} iterations" in note for note in ada.notes)
    for layer in cnn.layers:
        scale = weight_quantizer(rtn_sim, layer.name).get_scale().detach()
        torch.testing.assert_close(
            weight_quantizer(ada_sim, layer.name).get_scale().detach(), scale
        )
        step = (
            ada.model.get_submodule(layer.name).weight - rtn.model.get_submodule(layer.name).weight
        )
        assert torch.round(step / scale).abs().max() <= 1


def test_amp_bits_and_calibration_accuracy(cnn: Case) -> None:
    run, sim = cnn.run("aimet-amp")
    for name, bits in run.stored_bits.items():
        weight = cnn.model.get_submodule(name).weight
        width = (bits - 64 * weight.shape[0]) / weight.numel()
        assert width in (2, 4, 8)
        assert weight_quantizer(sim, name).bitwidth == width
    float_accuracy = cnn.accuracy(cnn.model, "calibration")
    assert cnn.accuracy(run.model, "calibration") >= float_accuracy - 0.01 - 1e-9
    assert "calibration" in run.notes[-1] and "activations float" in run.notes[-1]


def test_amp_large_drop_takes_lowest_candidate(cnn: Case) -> None:
    run, _ = cnn.run("aimet-amp", drop=0.9)
    for name, bits in run.stored_bits.items():
        weight = cnn.model.get_submodule(name).weight
        assert bits == packed_bits(weight.numel(), 2) + 64 * weight.shape[0]


@pytest.mark.parametrize(
    ("peer", "options"),
    [
        ("aimet-rtn", {"bits": 1}),
        ("aimet-rtn", {"bits": "4"}),
        ("aimet-rtn", {"bits": 4, "scheme": "mse"}),
        ("aimet-rtn", {"bits": 4, "group": 32}),
        ("aimet-adaround", {"bits": 4, "iterations": 0}),
        ("aimet-amp", {"candidates": (4,)}),
        ("aimet-amp", {"drop": 1.5}),
    ],
)
def test_bad_settings(cnn: Case, peer: str, options: dict) -> None:
    with pytest.raises(ConfigError):
        PEERS[peer].run(cnn.model, cnn.dataset, cnn.layers, Setting("bad", options))

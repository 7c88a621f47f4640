import copy
from typing import NamedTuple

import pytest
import torch
from peers.base import PeerRun, Setting
from peers.nncf import PEERS, _samples
from torch import Tensor, nn

from allot.data import forward
from allot.discover import discover
from allot.exceptions import ConfigError
from allot.zoo.data import Dataset, Split

nncf = pytest.importorskip("nncf", reason="nncf is not installed: pip install -e '.[peers]'")

PEER = PEERS[0]
SETTINGS = {setting.label: setting for setting in PEER.settings()}
INT8 = "int8_asym per-channel"
SYM = "int4_sym g64 r1.0 data-free"
ASYM = "int4_asym g64 r1.0 data-free"
ASYM_08 = "int4_asym g64 r0.8 data-free"
AWQ_SE = "int4_asym g64 r1.0 data-aware awq se"


@pytest.fixture(scope="module")
def mlp(model, dataset):
    return model, dataset, discover(model).layers


@pytest.fixture(scope="module")
def runs(mlp):
    model, dataset, layers = mlp
    return {label: PEER.run(model, dataset, layers, SETTINGS[label]) for label in (INT8, SYM, ASYM)}


def _hook(run: PeerRun, name: str) -> nn.Module:
    """NNCF's decompression hook on layer `name`'s weight (the model is held as `.model`)."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage

    hooks = [
        hook
        for hook_name, hook in get_hook_storage(run.model).named_hooks()
        if decode_hook_name(hook_name)[1] == f"model.{name}.weight"
    ]
    assert len(hooks) == 1
    return hooks[0]


def _nibbles(packed: Tensor) -> Tensor:
    """Two 4-bit codes per byte, low nibble first (NNCF's packing), as int16."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten().to(torch.int16)


class Decoded(NamedTuple):
    """A layer's codes, zero points (0 when symmetric) and scales from NNCF's real tensors, shaped
    (out, groups, group), (out, groups, 1), (out, groups, 1); the code bit-width."""

    q: Tensor
    zero: Tensor
    scale: Tensor
    bits: int
    symmetric: bool


def _decode(run: PeerRun, name: str, out: int, in_: int) -> Decoded:
    hook = _hook(run, name)
    codes = run.model.model.get_submodule(name).weight
    assert codes.dtype == torch.uint8 and hook._scale.dtype == torch.float16
    scale = hook._scale.float()
    groups = scale.numel() // out
    bits = 8 if codes.numel() == out * in_ else 4
    q = codes.to(torch.int16).flatten() if bits == 8 else _nibbles(codes)
    zero = getattr(hook, "_zero_point", None)
    symmetric = zero is None
    if symmetric:
        q = q - 8  # NNCF stores signed int4 codes offset by 8
        zero = torch.zeros(out * groups, dtype=torch.int16)
    else:
        assert zero.dtype == torch.uint8
        zero = zero.to(torch.int16).flatten() if bits == 8 else _nibbles(zero)
    return Decoded(
        q.reshape(out, groups, in_ // groups),
        zero.reshape(out, groups, 1),
        scale.reshape(out, groups, 1),
        bits,
        symmetric,
    )


def test_version_and_availability() -> None:
    assert PEER.unavailable() is None
    assert PEER.version() == nncf.__version__
    assert PEER.targets == "linear"


def test_settings_are_nncfs_recommended_set() -> None:
    labels = list(SETTINGS)
    assert len(labels) == len(set(labels)) == 8
    assert labels[0] == INT8
    for mode in ("int4_sym", "int4_asym"):
        for ratio_data in ("r1.0 data-free", "r0.8 data-free", "r0.8 data-aware"):
            assert f"{mode} g64 {ratio_data}" in SETTINGS
    assert SETTINGS[AWQ_SE].options["awq"] and SETTINGS[AWQ_SE].options["scale_estimation"]


@pytest.mark.parametrize("label", [INT8, SYM, ASYM])
def test_stored_bits_are_the_compressed_tensors(runs, mlp, label: str) -> None:
    model, _, layers = mlp
    run = runs[label]
    assert set(run.stored_bits) == {layer.name for layer in layers}
    for layer in layers:
        out, in_ = model.get_submodule(layer.name).weight.shape
        decoded = _decode(run, layer.name, out, in_)
        groups = decoded.scale.numel()
        # INT8 everywhere for INT8_ASYM; at INT4 the last layer is NNCF's INT8_ASYM backup.
        last = layer is layers[-1]
        assert decoded.bits == (8 if label == INT8 or last else 4)
        assert decoded.symmetric == (label == SYM and not last)
        assert groups == (out if decoded.bits == 8 else out * in_ // 64)
        zero_bits = 0 if decoded.symmetric else groups * decoded.bits
        expected = out * in_ * decoded.bits + groups * 16 + zero_bits
        assert run.stored_bits[layer.name] == expected


@pytest.mark.parametrize("label", [INT8, SYM, ASYM])
def test_dequantized_weights_lie_on_the_grid_within_half_a_step(runs, mlp, label: str) -> None:
    model, dataset, layers = mlp
    run = runs[label]
    dequantized = copy.deepcopy(model)
    for layer in layers:
        weight = model.get_submodule(layer.name).weight.detach()
        out, in_ = weight.shape
        q, zero, scale, bits, symmetric = _decode(run, layer.name, out, in_)
        low, high = (-8, 7) if symmetric else (0, 2**bits - 1)
        assert low <= q.min() and q.max() <= high
        grid = ((q - zero) * scale).reshape(out, in_)
        # The model's decompression hook computes the same values (in fp16, hence rtol).
        codes = run.model.model.get_submodule(layer.name).weight
        decompressed = _hook(run, layer.name)(codes).float().reshape(out, in_)
        assert torch.allclose(decompressed, grid, rtol=2e-3, atol=0)
        step = scale.abs().expand(-1, -1, q.shape[2]).reshape(out, in_)
        # NNCF rounds to nearest with a float32 scale, then holds the scale in fp16 and
        # dequantizes in fp16: each costs up to 2^-11 relative, of the steps from the zero point
        # (and of the half step) and of the value.
        fp16 = 2**-10 * (((q - zero).abs().reshape(out, in_) + 1) * step + grid.abs())
        error = (weight - grid).abs()
        # A symmetric grid maps the largest magnitude to -8, so weights above +7.5 steps clip to 7.
        clipped = (q.reshape(out, in_) == high) if symmetric else torch.zeros_like(error).bool()
        assert (error <= 0.5 * step + fp16)[~clipped].all()
        assert (error <= step + fp16).all()
        dequantized.get_submodule(layer.name).weight.data = decompressed
    # The returned model computes with exactly these weights.
    inputs, _ = next(dataset.test.batches(64))
    with torch.no_grad():
        assert torch.allclose(forward(run.model, inputs), forward(dequantized, inputs), atol=1e-5)


def test_int8_keeps_the_float_metrics(runs, mlp) -> None:
    model, dataset, _ = mlp
    float_metrics = dataset.task.evaluate(model, dataset)
    int8 = dataset.task.evaluate(runs[INT8].model, dataset)
    assert abs(int8["accuracy"] - float_metrics["accuracy"]) <= 0.01
    assert int8["loss"] == pytest.approx(float_metrics["loss"], rel=0.01)


def test_ratio_08_keeps_more_layers_at_int8(runs, mlp) -> None:
    model, dataset, layers = mlp
    mixed = PEER.run(model, dataset, layers, SETTINGS[ASYM_08])
    # test-mlp has one ratio-defining layer (the last is always INT8): 20% of it goes to INT8.
    assert sum(mixed.stored_bits.values()) > sum(runs[ASYM].stored_bits.values())
    assert mixed.stored_bits == runs[INT8].stored_bits
    assert any("2 of 2 layers at int8" in note for note in mixed.notes)


def test_awq_and_scale_estimation_use_the_data(runs, mlp) -> None:
    model, dataset, layers = mlp
    run = PEER.run(model, dataset, layers, SETTINGS[AWQ_SE])
    assert run.stored_bits == runs[ASYM].stored_bits
    first = layers[0].name
    out, in_ = model.get_submodule(first).weight.shape
    refit, rtn = _decode(run, first, out, in_), _decode(runs[ASYM], first, out, in_)
    assert not torch.equal(refit.scale, rtn.scale)  # scale estimation refit the scales
    float_accuracy = dataset.task.evaluate(model, dataset)["accuracy"]
    assert dataset.task.evaluate(run.model, dataset)["accuracy"] >= float_accuracy - 0.03


def test_the_float_model_is_left_alone(runs, mlp) -> None:
    model, _, layers = mlp
    for layer in layers:
        weight = model.get_submodule(layer.name).weight
        assert weight.dtype == torch.float32 and weight.requires_grad


class _Tokens(nn.Module):
    """A tiny model called like a transformer: embeddings, an MLP block, masked mean, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        hidden = self.down(nn.functional.gelu(self.up(self.embed(input_ids))))
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def test_keyword_inputs_are_traced_and_calibrated_without_padding() -> None:
    torch.manual_seed(0)
    model = _Tokens().eval()
    lengths = torch.tensor([3, 5, 2, 4, 6, 1, 3, 5])
    mask = (torch.arange(6) < lengths[:, None]).long()
    ids = torch.randint(1, 20, mask.shape) * mask
    split = Split({"input_ids": ids, "attention_mask": mask}, lengths)
    samples = _samples(split)
    assert [sample["input_ids"].shape for sample in samples] == [(1, n) for n in lengths.tolist()]
    assert all(sample["attention_mask"].all() for sample in samples)
    dataset = Dataset("tokens", None, split, split, split)  # type: ignore[arg-type]
    layers = discover(model).layers
    run = PEER.run(model, dataset, layers, SETTINGS[AWQ_SE])
    # up and down at int4 asym g64, head (the last layer) at int8 asym per channel; AWQ scales
    # the input of down (after the GELU) by a float32 vector, counted in down's bits.
    int4 = {
        name: o * i * 4 + (o * i // 64) * (16 + 4)
        for name, o, i in [("up", 128, 64), ("down", 64, 128)]
    }
    awq = 128 * 32
    assert run.stored_bits == {
        "up": int4["up"],
        "down": int4["down"] + awq,
        "head": 4 * 64 * 8 + 4 * 24,
    }
    assert any("AWQ scales the inputs of 1 layers" in note for note in run.notes)
    # The embedding is compressed too (NNCF's default) but is not one of allot's layers.
    assert any("embed.weight" in note for note in run.notes)
    with torch.no_grad():
        got, want = forward(run.model, split.inputs), forward(model, split.inputs)
    assert torch.allclose(got, want, atol=0.05)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "nf4"}, "mode 'nf4' is not one of"),
        ({"group_size": 0}, "group_size must be"),
        ({"ratio": 1.5}, "ratio must be in"),
        ({"ratio": "0.8"}, "ratio must be in"),
        ({"data_aware": "yes"}, "are bools"),
        ({"awq": True}, "need data_aware"),
        ({"extra": 1}, "unknown: \\['extra'\\]"),
    ],
)
def test_bad_settings_are_config_errors(mlp, change: dict, message: str) -> None:
    model, dataset, layers = mlp
    setting = Setting("bad", {**SETTINGS[ASYM].options, **change})
    with pytest.raises(ConfigError, match=message):
        PEER.run(model, dataset, layers, setting)
    int8_grouped = Setting("bad", {**SETTINGS[INT8].options, "group_size": 64})
    with pytest.raises(ConfigError, match="per channel"):
        PEER.run(model, dataset, layers, int8_grouped)

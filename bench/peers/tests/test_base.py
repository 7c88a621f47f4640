import pytest
import torch
from peers import ADAPTERS, all_peers, get_peer
from peers.base import Peer, PeerRun, Setting, packed_bits, ratio, tensor_bits
from torch import nn

from allot.api import prepare
from allot.exceptions import ConfigError
from allot.zoo import create_model


def _layers():
    work, _, discovery, _ = prepare(create_model("test-mlp"))
    return work, discovery.layers


def test_ratio_counts_float_for_layers_the_peer_left_alone() -> None:
    work, layers = _layers()
    counts = {layer.name: work.get_submodule(layer.name).weight.numel() for layer in layers}
    first, *rest = layers
    stored = {first.name: 4 * counts[first.name]}  # 4 bits per weight, others float
    expected = (
        32
        * sum(counts.values())
        / (4 * counts[first.name] + 32 * sum(counts[layer.name] for layer in rest))
    )
    assert ratio(work, layers, stored) == pytest.approx(expected)
    assert ratio(work, layers, {}) == 1.0


def test_ratio_rejects_bits_for_unknown_layers() -> None:
    work, layers = _layers()
    with pytest.raises(ConfigError, match="not compressible"):
        ratio(work, layers, {"nowhere": 8})


def test_tensor_and_packed_bits() -> None:
    assert tensor_bits(torch.zeros(3, 5, dtype=torch.float16)) == 3 * 5 * 16
    assert tensor_bits(torch.zeros(7, dtype=torch.int8)) == 56
    assert packed_bits(10, 3) == 30
    with pytest.raises(ConfigError, match="at least 1 bit"):
        packed_bits(10, 0)


def _run(model: nn.Module, *_args: object) -> PeerRun:
    return PeerRun(model, {}, "none")


def test_a_missing_library_is_reported_in_one_line() -> None:
    peer = Peer("ghost", "no-such-distribution-allot", "linear", list, _run)
    reason = peer.unavailable()
    assert reason is not None and reason.startswith("ghost:") and "\n" not in reason
    with pytest.raises(ConfigError, match="pip install"):
        peer.version()
    importable = Peer("torch-peer", "torch", "linear", lambda: [Setting("x")], _run, ("torch",))
    assert importable.unavailable() is None
    assert importable.version().startswith(torch.__version__.split("+")[0])


def test_registry_lists_every_adapter_and_rejects_unknown_names() -> None:
    peers = all_peers()
    assert {peer.targets for peer in peers.values()} <= {"conv", "linear"}
    assert len(ADAPTERS) == len(set(ADAPTERS))
    with pytest.raises(ConfigError, match="unknown peer"):
        get_peer("no-such-peer")

"""Peers: the quantizers a user would pick instead of allot, run on the same folded model, the same
calibration data and the same byte accounting (`base`), one adapter module per library.

The adapters import their library only when a setting runs, so listing them costs nothing and a
missing library is reported by `Peer.unavailable()` in one line instead of failing the benchmark.
"""

from __future__ import annotations

import importlib

from allot.exceptions import ConfigError
from peers.base import Peer, PeerRun, Setting, packed_bits, ratio, tensor_bits

ADAPTERS: tuple[str, ...] = ("aimet", "nncf", "hqq", "torchao", "quanto", "dynamic")


def all_peers() -> dict[str, Peer]:
    """Every peer of every adapter module, by name."""
    peers: dict[str, Peer] = {}
    for module in ADAPTERS:
        for peer in importlib.import_module(f"peers.{module}").PEERS:
            peers[peer.name] = peer
    return peers


def get_peer(name: str) -> Peer:
    """The peer called `name`; ConfigError listing the known ones otherwise."""
    peers = all_peers()
    if name not in peers:
        raise ConfigError(f"unknown peer {name!r}; known: {', '.join(sorted(peers))}")
    return peers[name]


__all__ = [
    "ADAPTERS",
    "Peer",
    "PeerRun",
    "Setting",
    "all_peers",
    "get_peer",
    "packed_bits",
    "ratio",
    "tensor_bits",
]

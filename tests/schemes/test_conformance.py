"""One conformance suite run over every registered scheme x every layer case.

Each scheme must promise exactly the storage its module really writes, reload from its own
artifact alone, compute what its dense weight says, be deterministic, and round-trip its JSON and
string forms. A new scheme must add examples here, or `test_examples_cover_every_scheme` fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from allot.exceptions import ConfigError
from allot.modules.base import dense_weight, layer_storage_bits
from allot.schemes import (
    SCHEMES,
    Codebook,
    Grouped,
    Keep,
    LowRank,
    Quant,
    Scheme,
    Sparse,
    Sum,
    Ternary,
    parse_scheme,
    scheme_from_json,
)

# (string form, scheme); every scheme here must apply to every case in conftest.SPECS.
EXAMPLES: list[tuple[str, Scheme]] = [
    ("quant:8", Quant(8)),
    ("quant:4", Quant(4)),
    ("quant:3:g4", Quant(3, 4)),
    ("quant:1", Quant(1)),
    ("quant:1:g4", Quant(1, 4)),
    ("quant:3:steered", Quant(3, rounding="steered")),
    ("quant:2:g4:steered", Quant(2, 4, "steered")),
    ("quant:1:steered", Quant(1, rounding="steered")),
    ("quant:4:zero-point", Quant(4, grid="zero-point")),
    ("quant:3:g4:zero-point:steered", Quant(3, 4, "steered", "zero-point")),
    ("quant:4:symmetric", Quant(4, grid="symmetric")),
    ("quant:2:g4:symmetric:steered", Quant(2, 4, "steered", "symmetric")),
    ("quant:5:float-offset:steered", Quant(5, None, "steered", "float-offset")),
    ("rank:2", LowRank(2)),
    ("rank:3", LowRank(3)),
    ("rank:2:whitened", LowRank(2, "whitened")),
    ("rank:3:whitened", LowRank(3, "whitened")),
    ("rank:2:q4", LowRank(2, bits=4)),
    ("rank:3:whitened:q2", LowRank(3, "whitened", 2)),
    ("rank:2:whitened:q1", LowRank(2, "whitened", 1)),
    ("grouped:1:3", Grouped(1, 3)),
    ("grouped:2:2", Grouped(2, 2)),  # 2 and 4 divide every case's input channels
    ("grouped:4:1", Grouped(4, 1)),
    ("grouped:2:2:whitened", Grouped(2, 2, "whitened")),
    ("grouped:2:2:q4", Grouped(2, 2, bits=4)),
    ("grouped:2:1:whitened:q3", Grouped(2, 1, "whitened", 3)),
    ("sparse:0.05", Sparse(0.05)),
    ("sparse:1", Sparse(1.0)),
    ("sparse:0.2:l1=0.5", Sparse(0.2, 0.5)),
    ("codebook:4", Codebook(4)),
    ("codebook:3", Codebook(3)),
    ("codebook:256", Codebook(256)),
    ("ternary", Ternary()),
    ("keep", Keep()),
    # schemes holding schemes: their JSON nests, their storage is the sum of their parts'
    ("quant:2+sparse:0.05", Sum((Quant(2), Sparse(0.05)))),
    ("rank:1+sparse:0.05", Sum((LowRank(1), Sparse(0.05)))),
    ("rank:1:whitened+sparse:0.05", Sum((LowRank(1, "whitened"), Sparse(0.05)))),
    ("quant:2+rank:2:whitened:q4", Sum((Quant(2), LowRank(2, "whitened", 4)))),
    ("grouped:2:1+sparse:0.05", Sum((Grouped(2, 1), Sparse(0.05)))),
    ("ternary+sparse:0.05", Sum((Ternary(), Sparse(0.05)))),
    ("codebook:2+rank:1", Sum((Codebook(2), LowRank(1)))),
    (
        "quant:2:g4:steered+rank:1+sparse:0.05",
        Sum((Quant(2, 4, "steered"), LowRank(1), Sparse(0.05))),
    ),
]


@pytest.fixture(params=EXAMPLES, ids=[text for text, _ in EXAMPLES])
def example(request: pytest.FixtureRequest) -> tuple[str, Scheme]:
    return request.param


def _compress(scheme: Scheme, layer) -> nn.Module:
    """Compress the `layer` fixture's case (conftest.LayerCase) with `scheme`, given its profile
    (schemes that do not fit to data ignore it)."""
    return scheme.compress(layer.weight, layer.bias, layer.spec, layer.profile)


def _save(module: nn.Module, tmp_path: Path) -> dict[str, torch.Tensor]:
    path = tmp_path / "layer.safetensors"
    save_file(module.state_dict(), path)
    return load_file(path)


def test_examples_cover_every_scheme() -> None:
    assert {scheme.kind for _, scheme in EXAMPLES} == set(SCHEMES)


def test_storage_bits_equal_the_saved_tensors(example, layer, tmp_path: Path) -> None:
    _, scheme = example
    saved = _save(_compress(scheme, layer), tmp_path)
    saved_bits = sum(8 * t.numel() * t.element_size() for k, t in saved.items() if k != "bias")
    assert scheme.storage_bits(layer.spec) == saved_bits
    assert layer_storage_bits(_compress(scheme, layer)) == saved_bits
    assert layer_storage_bits(scheme.empty(layer.spec)) == saved_bits
    assert ("bias" in saved) == layer.spec.bias
    if layer.spec.bias:
        assert saved["bias"].dtype == torch.float32
        assert torch.equal(saved["bias"], layer.bias)


def test_reloads_from_its_artifact_alone(example, layer, tmp_path: Path) -> None:
    _, scheme = example
    module = _compress(scheme, layer)
    fresh = scheme.empty(layer.spec)
    fresh.load_state_dict(_save(module, tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh(layer.x), module(layer.x))
        assert torch.equal(dense_weight(fresh), dense_weight(module))


def test_forward_matches_the_dense_weight(example, layer) -> None:
    _, scheme = example
    module = _compress(scheme, layer)
    with torch.no_grad():
        weight = dense_weight(module)
        assert weight.shape == layer.spec.weight_shape and weight.dtype == torch.float32
        expected = layer.spec.forward(layer.x, weight, layer.bias)
        torch.testing.assert_close(module(layer.x), expected, rtol=1e-5, atol=1e-5)


def test_compress_is_deterministic(example, layer) -> None:
    _, scheme = example
    first = _compress(scheme, layer).state_dict()
    second = _compress(scheme, layer).state_dict()
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_compress_refuses_tensors_that_do_not_fit(example, layer) -> None:
    _, scheme = example
    with pytest.raises(ConfigError):
        scheme.compress(layer.weight[1:], layer.bias, layer.spec)
    wrong_bias = None if layer.spec.bias else torch.zeros(layer.spec.out_features)
    with pytest.raises(ConfigError):
        scheme.compress(layer.weight, wrong_bias, layer.spec)


def test_json_round_trip(example) -> None:
    _, scheme = example
    assert scheme_from_json(json.loads(json.dumps(scheme.to_json()))) == scheme


def test_string_form_parses(example) -> None:
    text, scheme = example
    assert parse_scheme(text) == scheme


def test_labels_tell_the_examples_apart() -> None:
    labels = [scheme.label() for _, scheme in EXAMPLES]
    assert all(labels) and len(set(labels)) == len(labels)

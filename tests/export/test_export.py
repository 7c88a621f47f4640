"""Exports: ONNX files that onnxruntime runs to allot's outputs, with codes stored at their width;
torchao state dicts that load into the float architecture; one-line errors for what does not map."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from allot import Budget, compress, load, save
from allot.apply import apply
from allot.cli import main
from allot.data import forward
from allot.discover import discover
from allot.exceptions import ExportError
from allot.export import export
from allot.export.onnx import run_onnx
from allot.plan import LayerPlan, Plan
from allot.schemes import Keep, LowRank, Quant, Scheme, Sparse, Sum
from allot.zoo import create_model, get_dataset, get_entry

pytest.importorskip("onnxruntime")


class Small(nn.Module):
    """A conv and three Linear layers: every scheme applies to every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.a = nn.Linear(8 * 6 * 6, 32)
        self.b = nn.Linear(32, 16)
        self.c = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.c(torch.relu(self.b(torch.relu(self.a(h)))))


INTEGER_GRIDS = [
    Quant(4, grid="zero-point"),
    Quant(4, 32, grid="symmetric"),
    Quant(2, grid="zero-point"),
    Quant(8, grid="symmetric"),
]
PLANS = {
    "float offsets, odd widths, factors": [
        Quant(3, 4, grid="float-offset"),
        Quant(1),
        LowRank(4),
        Quant(2, 4, grid="float-offset"),
    ],
    "sparse, sums, more widths": [
        Sparse(0.1),
        Sum((LowRank(2), Quant(3, grid="zero-point"))),
        Sum((Quant(7, 4, grid="zero-point"), Sparse(0.05))),
        Quant(6, grid="symmetric"),
    ],
    "quantized factors": [
        LowRank(3, bits=4),
        LowRank(4, bits=3),
        Sum((LowRank(2, bits=8), Sparse(0.05))),
        LowRank(2, bits=1),
    ],
}


def _compressed(schemes: list[Scheme]) -> tuple[nn.Module, Plan]:
    torch.manual_seed(0)
    model = Small().eval()
    layers = discover(model).layers
    plan = Plan(
        "custom",
        "hand-made",
        "output",
        Budget("bits", 4),
        [LayerPlan(layer.name, layer.spec, s) for layer, s in zip(layers, schemes, strict=True)],
    )
    return apply(copy.deepcopy(model), plan), plan


def _relative(got, expected: torch.Tensor) -> float:
    got = torch.as_tensor(got)
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", list(PLANS))
def test_onnx_runs_every_scheme_to_allots_outputs(name: str, tmp_path: Path) -> None:
    model, plan = _compressed(PLANS[name])
    x = torch.randn(2, 4, 6, 6)
    path = export(model, plan, "onnx", tmp_path / "m.onnx", inputs=x)
    for batch in (x, torch.randn(5, 4, 6, 6)):  # the batch dimension is dynamic
        with torch.no_grad():
            expected = model(batch)
        assert _relative(run_onnx(path, batch)[0], expected) < 1e-5


def test_onnx_stores_codes_at_their_width_and_dequantizes_them_per_channel_or_block(
    tmp_path: Path,
) -> None:
    model, plan = _compressed(INTEGER_GRIDS)
    x = torch.randn(3, 4, 6, 6)
    path = export(model, plan, "onnx", tmp_path / "m.onnx", inputs=x)
    with torch.no_grad():
        assert _relative(run_onnx(path, x)[0], model(x)) < 1e-5
    graph = onnx.load(path).graph
    types = {i.name: i.data_type for i in graph.initializer}
    kinds = onnx.TensorProto
    assert types["conv.codes"] == kinds.UINT4 and types["conv.zero"] == kinds.UINT4
    assert types["a.codes"] == kinds.INT4 and "a.zero" not in types  # symmetric: signed codes
    assert types["b.codes"] == kinds.UINT2 and types["c.codes"] == kinds.INT8
    assert "a.weight" not in types and "conv.weight" not in types
    stored = {i.name: len(i.raw_data) for i in graph.initializer}
    assert stored["conv.codes"] == model.conv.codes.numel()  # the artifact's packed bytes
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    attributes = [{a.name: a.i for a in n.attribute} for n in dequantize]
    assert {"axis": 0} in attributes and {"axis": 1, "block_size": 32} in attributes


@pytest.mark.parametrize(
    "name",
    [
        "test-cnn",
        pytest.param("test-conv1d", marks=pytest.mark.slow),
        pytest.param("test-bert", marks=pytest.mark.slow),
    ],
)
def test_onnx_round_trips_the_test_models(name: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = create_model(name)
    dataset = get_dataset(get_entry(name).dataset, calibration_size=32, seed=0)
    result = compress(
        model,
        dataset.to_data(),
        "uniform-quant",
        Budget("bits", 4),
        model_name=name,
        progress=False,
    )
    save(result.model, result.plan, tmp_path / "art")
    loaded, plan = load(tmp_path / "art")
    inputs = dataset.example_inputs(4)
    path = export(loaded, plan, "onnx", tmp_path / "m.onnx", inputs=inputs)
    with torch.no_grad():
        expected = forward(loaded, inputs)
    assert _relative(run_onnx(path, inputs)[0], expected) < 1e-5


def test_torchao_state_dict_loads_into_the_trained_architecture(tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    model = create_model("test-cnn")  # conv + BatchNorm (folded) + Linear
    data = get_dataset("digits", calibration_size=32, seed=0).to_data()
    grid = [Quant(4, grid="zero-point"), Quant(3, 8, grid="symmetric")]
    plan_model = compress(
        model, data, _method(grid), Budget("ratio", 2), model_name="test-cnn", progress=False
    )
    save(plan_model.model, plan_model.plan, tmp_path / "art")
    loaded, plan = load(tmp_path / "art")
    path = export(
        loaded,
        plan,
        "torchao",
        tmp_path / "m.pt",
        architecture=lambda: create_model("test-cnn", pretrained=False),
    )
    state = torch.load(path, weights_only=True)
    from torchao.quantization import IntxUnpackedToInt8Tensor

    assert any(isinstance(v, IntxUnpackedToInt8Tensor) for v in state.values())
    architecture = create_model("test-cnn", pretrained=False).eval()
    architecture.load_state_dict(state, assign=True)  # the model's own names, BatchNorm included
    x = data.example_inputs(8)
    with torch.no_grad():
        assert _relative(architecture(x), loaded(x)) < 1e-5


def _method(schemes: list[Scheme]):
    from allot.methods import Method

    return Method(
        "pinned",
        "one scheme per layer, in order",
        lambda layer: [schemes[0] if layer.spec.kind != "linear" else schemes[1], Keep()],
        error_model="weight",
        allocator="uniform",
    )


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        (LowRank(2), "layer c: {} (LowRankLayer) has no torchao form"),
        (Quant(4, grid="float-offset"), "layer c: {} is a float-offset grid"),
        (Quant(1), "layer c: {} is a 1-bit scaled sign"),
    ],
)
def test_what_torchao_cannot_hold_is_named_by_layer(scheme, message, tmp_path) -> None:
    pytest.importorskip("torchao")
    schemes = [Quant(4, grid="zero-point"), Quant(4, grid="zero-point"), Keep(), scheme]
    model, plan = _compressed(schemes)
    with pytest.raises(ExportError, match=re.escape(message.format(scheme.label()))):
        export(model, plan, "torchao", tmp_path / "m.pt", architecture=Small)


def test_cli_exports_and_checks_onnx_and_names_the_layer_torchao_cannot_hold(
    tmp_path, capsys
) -> None:
    pytest.importorskip("torchao")
    art = tmp_path / "art"
    args = ["compress", "test-mlp", "--method", "uniform-quant", "--ratio", "2"]
    args += ["--out", str(art), "--calibration", "32"]
    args += ["--pin", "1=quant:4:zero-point", "--pin", "3=rank:2"]
    assert main(["--no-progress", *args]) == 0
    capsys.readouterr()
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", str(art), "--format", "onnx", "--out", str(onnx_file)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "onnxruntime matches allot within" in printed and onnx_file.is_file()
    code = main(["export", str(art), "--format", "torchao", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "layer 3: rank2 (LowRankLayer) has no torchao form" in err

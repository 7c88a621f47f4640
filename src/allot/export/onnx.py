"""ONNX export: quantized weights stored as their codes, dequantized by `DequantizeLinear` (QDQ).

The model is traced by torch's exporter (`torch.onnx.export(dynamo=True)`, opset `OPSET`, every
input dimension dynamic where the model allows) with each compressed layer standing in as a float
layer; each such layer's weight initializer is then replaced by a subgraph that computes it from
the stored form, so the operation that consumes it (Conv, MatMul, Gemm) is unchanged:

- quantized (`Quant`), bits 2, 4 and 8: the codes as a UINT2/UINT4/UINT8 tensor (INT2/INT4/INT8,
  codes minus 2**(bits-1), on symmetric grids), bit-packed by ONNX exactly as the artifact packs
  them; `DequantizeLinear` per output channel (`axis=0`) or per block of the group size
  (`axis=1, block_size`), its float16 scale cast to float32 first so that the weight is computed
  in float32 as allot computes it; the zero point as a UINT2/4/8 tensor (zero-point grids), none
  (symmetric: signed codes), or a float16 offset added after (float-offset grids). Bits 1, 3, 5,
  6 and 7 have no ONNX type: their packed bytes are stored as the artifact stores them and
  unpacked by a few bitwise ops (`BitShift`, `BitwiseAnd`) into UINT8 codes for
  `DequantizeLinear`; 1-bit codes are the scaled sign s (2 q - 1), in plain ops;
- sparse (`Sparse`): the float32 values scattered (`ScatterElements`) at their positions, stored
  as int32 (ONNX has no packed index type: ~1.6-2x the artifact's packed positions);
- low-rank (`LowRank`): the two factors as the layer runs them (two smaller operations, traced);
  inside a sum, their product (`MatMul`); quantized factors (`LowRank` with `bits`): each factor
  dequantized as a quantized layer is, their product (`MatMul`) the layer's weight;
- sums (`Sum`): the parts' weights added (`Sum`).
Every other layer is exported as traced (float layers as they are).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn

from allot.data import Inputs
from allot.exceptions import ExportError
from allot.files import atomic_write
from allot.modules.base import CompressedLayer, build_float_layer
from allot.modules.combo import SumLayer
from allot.modules.lowrank import LowRankLayer, QuantizedLowRankLayer
from allot.modules.quant import FLOAT_OFFSET, SYMMETRIC, ZERO_POINT, QuantizedLayer
from allot.modules.sparse import SparseLayer
from allot.plan import Plan

OPSET = 25
"""UINT2/INT2 codes in DequantizeLinear need opset 25 (UINT4/INT4 and blocks: 21)."""

_UNSIGNED = {2: TensorProto.UINT2, 4: TensorProto.UINT4, 8: TensorProto.UINT8}
_SIGNED = {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8}


def export_onnx(model: nn.Module, plan: Plan, inputs: Inputs, path: Path) -> Path:
    """Write `model` (an artifact as loaded, with its `plan`) as an ONNX file at `path`, traced
    on the example `inputs` (a tensor, a tuple of positional or a dict of keyword tensors)."""
    work = copy.deepcopy(model).eval()
    weights = _Subgraphs()
    for layer in plan.layers:
        module = work.get_submodule(layer.name)
        if not isinstance(module, CompressedLayer) or isinstance(module, LowRankLayer):
            continue  # float layers and low-rank factors are traced as they run
        name = f"{layer.name}.weight"
        weights.weight(name, module, layer.scheme.label(), layer.name)
        dense = torch.from_numpy(weights.dense[name])
        bias = None if module.bias is None else module.bias.detach()
        work.set_submodule(layer.name, build_float_layer(module.spec, dense, bias))
    proto = _trace(work, inputs)
    _replace_initializers(proto, weights)
    _strip(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"the exported ONNX graph is invalid: {str(exc).splitlines()[0]}"
        ) from exc
    atomic_write(path, proto.SerializeToString())
    return path


def _trace(model: nn.Module, inputs: Inputs) -> onnx.ModelProto:
    """The float model's ONNX graph, every parameter an initializer named by its path."""
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (_tuple(inputs), None)
    auto = torch.export.Dim.AUTO

    def dynamic(value: object) -> object:
        return {i: auto for i in range(value.dim())} if isinstance(value, Tensor) else None

    shapes = (
        {k: dynamic(v) for k, v in kwargs.items()}
        if kwargs is not None
        else tuple(dynamic(a) for a in args)
    )
    try:
        program = torch.onnx.export(
            model,
            args,
            kwargs=kwargs,
            dynamo=True,
            optimize=False,
            opset_version=OPSET,
            dynamic_shapes=shapes,
            verbose=False,
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch could not export the model to ONNX: {first}") from exc
    return program.model_proto


def _strip(proto: onnx.ModelProto) -> None:
    """Drop the tracer's debugging records (each node's Python stack trace, source paths and
    FX node text; the inferred shapes of intermediate values): they are not part of the
    model, and on a small model they outweigh its weights."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    del proto.graph.value_info[:]


def _tuple(inputs: Inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _replace_initializers(proto: onnx.ModelProto, weights: _Subgraphs) -> None:
    """Remove each replaced weight's initializer and put its subgraph first in the graph. A
    weight the traced graph does not use (a layer whose output never reaches the model's output,
    such as a pooler the model skips) was left out by the tracer: its subgraph is dropped too."""
    graph = proto.graph
    nodes = list(graph.node)
    needed = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    added = []
    for node in reversed(weights.nodes):
        if any(out in needed for out in node.output):
            added.append(node)
            needed.update(node.input)
    added.reverse()
    replaced = set(weights.outputs)
    kept = [init for init in graph.initializer if init.name not in replaced]
    _check_unused(kept, [name for name in weights.outputs if name not in needed], weights)
    new = [init for name, init in weights.initializers.items() if name in needed]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new])
    del graph.node[:]
    graph.node.extend([*added, *nodes])
    inputs = [i for i in graph.input if i.name not in replaced]
    del graph.input[:]
    graph.input.extend(inputs)


def _check_unused(kept: list[TensorProto], unused: list[str], weights: _Subgraphs) -> None:
    """`ExportError` when the weight of a layer the graph seems not to use is in the graph under
    another name (the tracer copied it): the layer would run in float, not from its codes."""
    for name in unused:
        dense = weights.dense[name]
        for init in kept:
            if init.data_type != TensorProto.FLOAT or np.prod(init.dims) != dense.size:
                continue
            array = onnx.numpy_helper.to_array(init).reshape(-1)
            if np.array_equal(array, dense.reshape(-1)) or np.array_equal(
                array, dense.reshape(dense.shape[0], -1).T.reshape(-1)
            ):
                raise ExportError(
                    f"the traced graph holds layer {name.removesuffix('.weight')}'s weight as "
                    f"{init.name!r}, not under its own name: it cannot be replaced by its codes"
                )


class _Subgraphs:
    """The nodes and initializers that compute compressed weights inside the ONNX graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.outputs: list[str] = []
        self.dense: dict[str, np.ndarray] = {}

    def weight(self, out: str, module: CompressedLayer, label: str, layer: str) -> None:
        """Nodes computing the dense float32 weight of `module` (its `spec.weight_shape`) as
        `out`; `ExportError` naming `layer` for a layer kind with no ONNX form."""
        self.outputs.append(out)
        with torch.no_grad():
            self.dense[out] = module.reconstruct().numpy()
        self._emit(module, out, out.removesuffix(".weight"), label, layer)

    def _emit(self, module: CompressedLayer, out: str, prefix: str, label: str, layer: str) -> None:
        if isinstance(module, QuantizedLayer):
            flat = self._quantized(module, prefix)
        elif isinstance(module, SparseLayer):
            flat = self._sparse(module, prefix)
        elif isinstance(module, LowRankLayer):
            flat = self._node(
                "MatMul",
                [self._float(f"{prefix}.u", module.u), self._float(f"{prefix}.v", module.v)],
            )
        elif isinstance(module, QuantizedLowRankLayer):
            u = self._quantized(module.second, f"{prefix}.second")
            v = self._quantized(module.first, f"{prefix}.first")
            v = self._node("Reshape", [v, self._shape((module.rank, module.spec.fan_in))])
            flat = self._node("MatMul", [u, v])
        elif isinstance(module, SumLayer):
            parts = []
            for k, part in enumerate(module.parts):
                parts.append(f"{prefix}.parts.{k}.weight")
                self._emit(part, parts[-1], f"{prefix}.parts.{k}", label, layer)
            flat = self._node("Sum", parts)
        else:
            raise ExportError(
                f"layer {layer}: {label} ({type(module).__name__}) has no ONNX form in this export "
                "(quantized, sparse and low-rank layers and their sums have)"
            )
        self._node("Reshape", [flat, self._shape(module.spec.weight_shape)], out)

    def _node(self, op: str, inputs: list[str], out: str | None = None, **attributes) -> str:
        out = out or f"/allot/{len(self.nodes)}/{op}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attributes))
        return out

    def _tensor(self, name: str, dtype: int, dims: tuple[int, ...], raw: bytes) -> str:
        tensor = TensorProto(name=name, data_type=dtype, dims=list(dims), raw_data=raw)
        self.initializers[name] = tensor
        return name

    def _float(self, name: str, value: Tensor) -> str:
        array = value.detach().to(torch.float32).contiguous().numpy()
        return self._tensor(name, TensorProto.FLOAT, array.shape, array.tobytes())

    def _shape(self, dims: tuple[int, ...]) -> str:
        name = "/allot/shape/" + "x".join(map(str, dims))
        if name not in self.initializers:
            array = np.asarray(dims, dtype=np.int64)
            self._tensor(name, TensorProto.INT64, array.shape, array.tobytes())
        return name

    def _quantized(self, layer: QuantizedLayer, prefix: str) -> str:
        """(out, fan_in) float32 weight of a quantized layer."""
        grid = layer.quant_grid()
        out, fan_in = layer.spec.out_features, layer.spec.fan_in
        groups = grid.scale.shape[1]
        per_channel = groups == 1
        table = (out,) if per_channel else (out, groups)
        half = torch.float16
        scale = self._node(
            "Cast",
            [self._tensor(f"{prefix}.scale", TensorProto.FLOAT16, table, _raw(grid.scale, half))],
            to=TensorProto.FLOAT,
        )
        if layer.bits == 1:  # scaled sign: s (2 q - 1), in plain ops
            codes = self._node("Cast", [self._unpacked(layer, prefix)], to=TensorProto.FLOAT)
            sign = self._node("Sub", [self._node("Add", [codes, codes]), self._one()])
            scale = self._node("Unsqueeze", [scale, self._axes(1)]) if per_channel else scale
            grouped = self._node("Reshape", [sign, self._shape((out, groups, fan_in // groups))])
            columns = self._node("Unsqueeze", [scale, self._axes(2)])
            return self._node("Mul", [grouped, columns])
        zero = None
        if layer.bits in _UNSIGNED:
            signed = grid.kind == SYMMETRIC
            kind = (_SIGNED if signed else _UNSIGNED)[layer.bits]
            codes = self._tensor(f"{prefix}.codes", kind, (out, fan_in), _codes_raw(layer, signed))
            if grid.kind == ZERO_POINT:
                raw = bytes(layer.zero.numpy())
                zero = self._tensor(f"{prefix}.zero", kind, table, raw)
        else:
            codes = self._unpacked(layer, prefix)
            middle = grid.zero_points()
            if middle is not None:
                raw = middle.to(torch.uint8).contiguous().numpy().tobytes()
                zero = self._tensor(f"{prefix}.zero", TensorProto.UINT8, table, raw)
        attributes = {"axis": 0} if per_channel else {"axis": 1, "block_size": fan_in // groups}
        inputs = [codes, scale] + ([zero] if zero is not None else [])
        weight = self._node("DequantizeLinear", inputs, **attributes)
        if grid.kind != FLOAT_OFFSET:
            return weight
        offset = self._node(
            "Cast",
            [
                self._tensor(
                    f"{prefix}.offset", TensorProto.FLOAT16, (out, groups), _raw(grid.offset, half)
                )
            ],
            to=TensorProto.FLOAT,
        )
        grouped = self._node("Reshape", [weight, self._shape((out, groups, fan_in // groups))])
        return self._node("Add", [grouped, self._node("Unsqueeze", [offset, self._axes(2)])])

    def _unpacked(self, layer: QuantizedLayer, prefix: str) -> str:
        """UINT8 codes (out, fan_in) unpacked in the graph from the artifact's packed bytes.

        Eight consecutive codes of `bits` bits fill exactly `bits` bytes: the packed stream is
        read as rows of `bits` bytes (zero-padded), and code j of a row is the 16-bit window of
        its first two bytes shifted right by (j bits mod 8) and masked."""
        bits, count = layer.bits, layer.spec.numel
        rows = -(-count // 8)
        packed = np.zeros(rows * bits + 1, dtype=np.uint8)  # + one zero byte: the last window
        packed[: layer.codes.numel()] = layer.codes.numpy()
        stream = self._tensor(f"{prefix}.codes", TensorProto.UINT8, packed.shape, packed.tobytes())
        table = f"/allot/unpack{bits}"
        if f"{table}/first" not in self.initializers:
            first = np.array([j * bits // 8 for j in range(8)], dtype=np.int64)
            shift = np.array([j * bits % 8 for j in range(8)], dtype=np.uint32)
            mask = np.array([(1 << bits) - 1], dtype=np.uint32)
            self._tensor(f"{table}/first", TensorProto.INT64, (8,), first.tobytes())
            self._tensor(f"{table}/shift", TensorProto.UINT32, (8,), shift.tobytes())
            self._tensor(f"{table}/mask", TensorProto.UINT32, (1,), mask.tobytes())
        if "/allot/eight" not in self.initializers:
            eight = np.array([8], dtype=np.uint32).tobytes()
            self._tensor("/allot/eight", TensorProto.UINT32, (1,), eight)
        wide = self._node("Cast", [stream], to=TensorProto.UINT32)
        # the first byte of every code: row r * bits plus the code's byte within its row
        base = self._node("Mul", [self._range(rows), self._int64(bits)])
        index = self._node(
            "Add", [self._node("Unsqueeze", [base, self._axes(1)]), f"{table}/first"]
        )
        low = self._node("Gather", [wide, index])
        high = self._node("Gather", [wide, self._node("Add", [index, self._int64(1)])])
        window = self._node(
            "BitwiseOr",
            [low, self._node("BitShift", [high, "/allot/eight"], direction="LEFT")],
        )
        codes = self._node(
            "BitwiseAnd",
            [
                self._node("BitShift", [window, f"{table}/shift"], direction="RIGHT"),
                f"{table}/mask",
            ],
        )
        flat = self._node("Reshape", [codes, self._shape((rows * 8,))])
        used = self._node("Slice", [flat, self._int64(0), self._int64(count)])
        shaped = self._node(
            "Reshape", [used, self._shape((layer.spec.out_features, layer.spec.fan_in))]
        )
        return self._node("Cast", [shaped], to=TensorProto.UINT8)

    def _sparse(self, layer: SparseLayer, prefix: str) -> str:
        """(numel,) float32 weight of a sparse layer: its values scattered into zeros."""
        positions = layer.positions()
        wide = layer.spec.numel > np.iinfo(np.int32).max
        dtype, kind = (np.int64, TensorProto.INT64) if wide else (np.int32, TensorProto.INT32)
        array = positions.numpy().astype(dtype)
        indices = self._tensor(f"{prefix}.indices", kind, array.shape, array.tobytes())
        values = self._float(f"{prefix}.values", layer.values)
        zeros = self._node(
            "ConstantOfShape",
            [self._shape((layer.spec.numel,))],
            value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        )
        return self._node("ScatterElements", [zeros, indices, values], axis=0)

    def _int64(self, value: int) -> str:
        name = f"/allot/int64/{value}"
        if name not in self.initializers:
            self._tensor(name, TensorProto.INT64, (1,), np.array([value], dtype=np.int64).tobytes())
        return name

    def _axes(self, axis: int) -> str:
        return self._int64(axis)

    def _one(self) -> str:
        name = "/allot/one"
        if name not in self.initializers:
            self._tensor(name, TensorProto.FLOAT, (), np.array(1.0, dtype=np.float32).tobytes())
        return name

    def _range(self, count: int) -> str:
        """int64 [0, count) computed in the graph."""
        return self._node("Range", [self._scalar(0), self._scalar(count), self._scalar(1)])

    def _scalar(self, value: int) -> str:
        name = f"/allot/scalar/{value}"
        if name not in self.initializers:
            self._tensor(name, TensorProto.INT64, (), np.array(value, dtype=np.int64).tobytes())
        return name


def _raw(tensor: Tensor, dtype: torch.dtype) -> bytes:
    return tensor.detach().to(dtype).contiguous().numpy().tobytes()


def _codes_raw(layer: QuantizedLayer, signed: bool) -> bytes:
    """The layer's packed codes as ONNX packs a (U)INT2/4/8 tensor: the same little-endian bit
    stream; signed codes q - 2**(bits-1) in two's complement flip each code's top bit."""
    packed = layer.codes.numpy().copy()
    if signed:
        top = {2: 0xAA, 4: 0x88, 8: 0x80}[layer.bits]
        packed ^= np.uint8(top)
        spare = (packed.size * 8 - layer.spec.numel * layer.bits) // layer.bits
        if spare:  # padding codes past the last element stay zero
            keep = 8 - spare * layer.bits
            packed[-1] &= np.uint8((1 << keep) - 1)
    return packed.tobytes()


def run_onnx(path: str | Path, inputs: Inputs) -> list[np.ndarray]:
    """The outputs of an exported ONNX file on `inputs`, run by onnxruntime (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, dict):
        feed = {name: inputs[name] for name in names}
    else:
        feed = dict(zip(names, _tuple(inputs), strict=True))
    return session.run(None, {k: v.detach().cpu().numpy() for k, v in feed.items()})

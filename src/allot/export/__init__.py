"""Export: a compressed model in the formats other runtimes load.

- `onnx` (`allot.export.onnx`): one ONNX file (opset 25) whose quantized weights are stored as
  their codes and feed `DequantizeLinear` (QDQ) per channel or per block; low-rank layers run as
  their two factors, sparse layers scatter their values; onnxruntime runs it.
- `torchao` (`allot.export.torchao`): a state dict of the model as trained (its own parameter
  names), whose quantized Linear and Conv2d weights are torchao `IntxUnpackedToInt8Tensor`s,
  written with `torch.save` and read back with `torch.load(weights_only=True)`.

A layer whose scheme has no form in the format raises `ExportError` naming the layer (docs/export.md
has the mapping table). Exports never change the artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from allot.data import Inputs
from allot.exceptions import ExportError
from allot.plan import Plan

FORMATS = ("onnx", "torchao")


def export(
    model: nn.Module,
    plan: Plan,
    fmt: str,
    path: str | Path,
    *,
    inputs: Inputs | None = None,
    architecture: Callable[[], nn.Module] | None = None,
) -> Path:
    """Write the compressed `model` (an artifact as `allot.load` returns it, with its `plan`) in
    format `fmt` to `path`. `onnx` traces the model on example `inputs`; `torchao` maps the
    weights onto the float `architecture` the model was compressed from (a factory: its
    parameter names are the state dict's). Returns the path written."""
    path = Path(path)
    if fmt == "onnx":
        if inputs is None:
            raise ExportError("an ONNX export traces the model: give example inputs")
        from allot.export.onnx import export_onnx

        return export_onnx(model, plan, inputs, path)
    if fmt == "torchao":
        if architecture is None:
            raise ExportError("a torchao export needs the float architecture (a factory)")
        from allot.export.torchao import export_torchao

        return export_torchao(model, plan, architecture, path)
    raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")

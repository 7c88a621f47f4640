"""ONNX and torchao exports of 4-bit models: do other runtimes compute what allot computes, and
how large are the files?

Each model is compressed by `uniform-quant` at 4 bits (round-to-nearest) on each grid of `--grids`
(the default float-offset grid, and the zero-point grid: every layer pinned to `quant:4:GRID`),
saved as an artifact and reloaded, then exported: ONNX (`allot export --format onnx`), run by onnxruntime
on held-out inputs, and torchao (`--format torchao`), loaded into the float architecture with
`torch.load(weights_only=True)`; torchao has no float offsets, so a float-offset model's torchao
export is refused (the row gives the one-line reason). The table gives the largest difference from allot's reload
relative to the largest output, and each file's size against the artifact's `model.safetensors`.
Writes bench/results/export.{json,md}.

    python bench/export.py --models mnist-resnet20,minilm
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import RESULTS, code_version, command

from allot import Budget, Policy, compress, load, save
from allot.data import forward
from allot.exceptions import ExportError
from allot.export import export
from allot.export.onnx import run_onnx
from allot.files import atomic_write, write_json
from allot.io import WEIGHTS
from allot.source import zoo_factory
from allot.zoo import create_model, get_dataset, get_entry

SAMPLES = 64
CALIBRATION = {"minilm": 128}


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def run_model(name: str, grid: str, seed: int) -> dict:
    dataset = get_dataset(
        get_entry(name).dataset, calibration_size=CALIBRATION.get(name, 512), seed=seed
    )
    data = dataset.to_data()
    result = compress(
        create_model(name), data, "uniform-quant", Budget("bits", 4), model_name=name, seed=seed,
        policy=Policy.parse((), [f"*=quant:4:{grid}"]), progress=False,
    )  # fmt: skip
    inputs = dataset.example_inputs(SAMPLES)  # the first held-out (test) samples
    with tempfile.TemporaryDirectory() as tmp:
        directory = save(result.model, result.plan, Path(tmp) / "artifact")
        model, plan = load(directory)
        with torch.no_grad():
            expected = forward(model, inputs)
        artifact = (directory / WEIGHTS).stat().st_size
        onnx_file = export(
            model, plan, "onnx", Path(tmp) / "model.onnx", inputs=dataset.example_inputs(2)
        )
        onnx_out = torch.from_numpy(run_onnx(onnx_file, inputs)[0])
        row = {
            "model": name,
            "ratio": plan.ratio,
            "grid": plan.layers[0].scheme.grid,
            "artifact_bytes": artifact,
            "onnx_bytes": onnx_file.stat().st_size,
            "onnx_difference": relative(onnx_out, expected),
            "samples": SAMPLES,
        }
        try:
            torchao_file = export(
                model, plan, "torchao", Path(tmp) / "model.pt", architecture=zoo_factory(name)
            )
        except ExportError as exc:
            row["torchao_refused"] = str(exc)
        else:
            float_model = zoo_factory(name)().eval()
            float_model.load_state_dict(torch.load(torchao_file, weights_only=True), assign=True)
            with torch.no_grad():
                torchao_out = forward(float_model, inputs)
            row["torchao_bytes"] = torchao_file.stat().st_size
            row["torchao_difference"] = relative(torchao_out, expected)
    print(row, flush=True)
    return row


def markdown(results: dict) -> str:
    lines = [
        "# Exports of 4-bit models: onnxruntime and torchao against allot",
        "",
        f"Command: `{results['command']}`  ",
        f"Code: {results['code']}  ",
        f"torch {results['torch']}. Each model is compressed by `uniform-quant` at 4 bits "
        "(round-to-nearest, on the row's grid), saved and reloaded, then exported. Difference: the "
        f"largest |export - allot| over {SAMPLES} held-out samples, relative to allot's largest "
        "output (acceptance: ONNX within 1e-3). Sizes against the artifact's `model.safetensors` "
        "(acceptance: ONNX within 10%); torchao keeps one code per int8.",
        "",
        "| model | grid | ratio | artifact bytes | ONNX bytes | ONNX / artifact | ONNX difference "
        "| torchao bytes | torchao / artifact | torchao difference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    refusals = []
    for r in results["rows"]:
        if "torchao_refused" in r:
            torchao = "| refused | | "
            refusals.append(f"- {r['model']}, {r['grid']}: {r['torchao_refused']}")
        else:
            torchao = (
                f"| {r['torchao_bytes']:,} | {r['torchao_bytes'] / r['artifact_bytes']:.3f} "
                f"| {r['torchao_difference']:.1e} "
            )
        lines.append(
            f"| {r['model']} | {r['grid']} | {r['ratio']:.2f}x | {r['artifact_bytes']:,} "
            f"| {r['onnx_bytes']:,} | {r['onnx_bytes'] / r['artifact_bytes']:.3f} "
            f"| {r['onnx_difference']:.1e} {torchao}|"
        )
    if refusals:
        lines += ["", "torchao refusals (one line each, as `allot export` prints them):", *refusals]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist-resnet20,minilm")
    parser.add_argument("--grids", default="float-offset,zero-point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "code": code_version(),
        "torch": torch.__version__,
        "rows": [
            run_model(name, grid, args.seed)
            for name in args.models.split(",")
            for grid in args.grids.split(",")
        ],
        "command": command(),
    }
    write_json(RESULTS / "export.json", results)
    text = markdown(results)
    atomic_write(RESULTS / "export.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()

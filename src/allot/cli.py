"""The `allot` command: compress, refine, evaluate, analyze, report, zoo, demo.

`compress`, `analyze`, `refine` and `evaluate` run on `--device` (the model and every batch are
moved there). Under `torchrun` they profile data-parallel (`allot.distributed`): every process
computes the same plan, only rank 0 prints and writes; the others stage into a temporary directory
that is removed.

Every `AllotError`, every bad argument and every failure of the file system (a full disk, a
permission) becomes one line on stderr and exit code 2 (`--debug` shows the traceback). An
interrupt (Ctrl-C, SIGINT) prints one line and exits with 130, the shell's code for a command
stopped by SIGINT, so that scripts and make stop as they would for any interrupted command; exit
code 2 keeps its one meaning, "the input was refused". Outputs are written whole or not at all
(`allot.files.staged_directory`), and `--out` is checked before the long work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from allot import api, distributed, hf, runtime
from allot.budget import Budget
from allot.data import Data, check_data, forward, on_device
from allot.errors import ERROR_MODELS
from allot.evaluate import file_bytes, latencies, macs, metrics, parameter_count
from allot.exceptions import AllotError, ArtifactError, ConfigError, DataError, ExportError
from allot.export import FORMATS
from allot.files import read_json, staged_directory, write_json
from allot.io import CHECKPOINT, WEIGHTS, is_artifact_file, load, read_plan, write_artifact
from allot.methods import METHODS, Method, get_method
from allot.plan import Plan
from allot.policy import Policy
from allot.profile.cache import Cache, default_directory
from allot.profile.measure import mean_loss
from allot.refine import REFINERS, get_refiner
from allot.report.markdown import ANALYSIS_FILES, REPORT, write_report
from allot.resources import peak_memory
from allot.sensitivity import Sensitivity
from allot.source import (
    LOSSES,
    build,
    file_factory,
    float_model,
    is_file_reference,
    is_tensor_file,
    tensor_batches,
    user_data,
    zoo_data,
    zoo_data_of,
    zoo_factory,
)

EVALUATION = "evaluation.json"
ONNX_TOLERANCE = 1e-3
"""Largest relative difference (max |onnx - allot| / max |allot|) an ONNX export may have."""
console = Console()


def _data(args: argparse.Namespace, model_ref: str, model: nn.Module, data: str | None) -> Data:
    """The data a command runs on, its batches moved to --device as they are read."""
    return on_device(_read_data(args, model_ref, model, data), args.device)


def _read_data(
    args: argparse.Namespace, model_ref: str, model: nn.Module, data: str | None
) -> Data:
    """The data a command runs on: the zoo model's own data set, a zoo data set named by --data,
    or the user's data factory or tensor file (with --loss and --held-out)."""
    calibration, seed = getattr(args, "calibration", 512), getattr(args, "seed", 0)
    if hf.is_hf_reference(model_ref):
        if data is None or not data.endswith(".txt"):
            raise DataError("an hf:PATH model needs --data FILE.txt, one calibration text a line")
        if args.loss not in (None, "distill"):
            raise DataError("text lines have no labels: their loss is distill")
        directory = model_ref.removeprefix(hf.PREFIX)
        return hf.text_data(data, model, hf.tokenizer(directory), calibration, args.held_out)
    if data is not None and data.endswith(".txt"):
        raise DataError("a text file of lines needs a Hugging Face model (--model hf:PATH)")
    if data is None:
        if is_file_reference(model_ref):
            raise DataError(
                "a model given as FILE.py:FACTORY needs --data (a zoo data set, FILE.py:FACTORY, "
                "or a .npz/.safetensors file)"
            )
        if args.held_out is not None:
            raise DataError("--held-out goes with your own --data; zoo data sets have a test split")
        return zoo_data_of(model_ref, calibration, seed)
    if is_file_reference(data) or is_tensor_file(data):
        return user_data(data, model, args.loss, calibration=calibration, held_out=args.held_out)
    if args.loss is not None or args.held_out is not None:
        raise DataError(
            "--loss and --held-out go with your own --data file; a zoo data set has its own"
        )
    return zoo_data(data, calibration, seed)


def _evaluation(
    model: nn.Module,
    data: Data,
    size_bytes: int,
    ratio: float,
    file_ratio: float,
    with_latency: bool = False,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = dict(metrics(model, data))
    if data.evaluate is None:
        result["held_out"] = "not given"
    result["calibration_loss"] = mean_loss(model, data)
    result["parameters"] = parameter_count(model)
    result["bytes"] = size_bytes
    result["ratio"] = ratio
    result["file_ratio"] = file_ratio
    result["macs"] = macs(model, data.example_inputs(1))
    if with_latency:
        batch = data.example_inputs(64)
        own, float_time = latencies([model, reference or model], batch)
        result["latency_s"] = own
        result["latency_ratio"] = own / float_time
    return result


def _print_evaluation(label: str, result: dict[str, Any]) -> None:
    console.print(f"[bold]{label}[/bold]")
    for key, value in result.items():
        if key in ("ratio", "file_ratio", "latency_ratio"):
            text = f"{value:.2f}x"
        elif isinstance(value, int):
            text = f"{value:,}"
        elif isinstance(value, float):
            text = f"{value:.4f}" if key != "latency_s" else f"{value * 1e3:.2f} ms"
        else:
            text = str(value)
        print(f"{key}: {text}")


def _cache(args: argparse.Namespace) -> Cache:
    """The profile cache (`$ALLOT_CACHE` or ~/.cache/allot), or a disabled one with --no-cache."""
    return Cache(None if args.no_cache else default_directory())


def _budget(args: argparse.Namespace, default: Budget | None = None) -> Budget:
    macs_ratio = getattr(args, "macs_ratio", None)
    if args.lossless:
        return Budget("lossless", None, macs_ratio)
    if args.max_damage is not None:
        return Budget("damage", args.max_damage, macs_ratio)
    if args.max_loss_increase is not None:
        return Budget("loss", args.max_loss_increase, macs_ratio)
    for kind in ("ratio", "avg_bits", "bytes", "bits"):
        value = getattr(args, kind)
        if value is not None:
            return Budget(kind, value, macs_ratio)
    if macs_ratio is not None:
        raise AllotError(
            "--macs-ratio limits compute beside a size budget: give --ratio, --avg-bits, --bytes "
            "or --bits too"
        )
    if default is not None:
        return default
    method = get_method(args.method)
    if method.budget is not None:
        return method.budget
    raise AllotError(
        "give a budget: --bits, --ratio, --avg-bits, --bytes, --max-damage, --lossless or "
        "--max-loss-increase"
    )


def _inputs(args: argparse.Namespace, ref: str | None) -> list[Path]:
    """The files a command reads, which its --out may not contain: the model file, the weights,
    the data files, and a zoo model's checkpoint."""
    paths = [args.weights, args.held_out]
    for reference in (ref, args.data):
        if reference is not None and is_file_reference(reference):
            paths.append(reference.rpartition(":")[0])
        elif reference is not None and is_tensor_file(reference):
            paths.append(reference)
    if ref is not None and not is_file_reference(ref):
        from allot.zoo import MODELS

        if ref in MODELS:
            paths.append(MODELS[ref].checkpoint)
    return [Path(p) for p in paths if p is not None]


def _screen_margin(text: str) -> float:
    """--screen's value: a finite number >= 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 1 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1, got {text!r}")
    return value


@contextlib.contextmanager
def _staged(
    target: Path, owned: Callable[[str], bool], inputs: Iterable[Path], error: type[AllotError]
) -> Iterator[Path]:
    """`staged_directory(target, ...)` on rank 0 (or without torchrun); on the other ranks, which
    compute the same outputs but must not write them, a temporary directory that is removed."""
    if distributed.is_main():
        with staged_directory(target, owned, inputs, error) as staging:
            yield staging
    else:
        with tempfile.TemporaryDirectory(prefix="allot-rank-") as scratch:
            yield Path(scratch)


def cmd_compress(args: argparse.Namespace) -> None:
    ref = args.model_file or args.model
    if ref is None:
        raise AllotError(
            "name a zoo model (see `allot zoo list`) or give --model FILE.py:FACTORY or hf:PATH"
        )
    if hf.is_hf_reference(ref):
        ref = hf.PREFIX + str(Path(ref.removeprefix(hf.PREFIX)).expanduser().resolve())
    if args.model_file and args.model:
        raise AllotError("give either a zoo model name or --model FILE.py:FACTORY, not both")
    # --scheme gives every layer one scheme, which fixes the size: the budget then only checks
    # it, by default that the plan is no larger than float.
    budget = _budget(args, Budget("ratio", 1.0) if args.scheme else None)
    # --scheme's catch-all pin comes first, so that --keep and --pin refine it
    scheme = Policy.parse((), [f"*={args.scheme}"] if args.scheme else ())
    policy = Policy((*scheme.rules, *Policy.parse(args.keep or (), args.pin or ()).rules))
    out = Path(args.out)
    method = get_method(args.method)
    if args.screen is not None:
        method = dataclasses.replace(method, screen=args.screen)
    refinement = _refinement(args, method, out)
    with _staged(out, is_artifact_file, _inputs(args, ref), ArtifactError) as staging:
        model = float_model(ref, args.weights).to(args.device)
        data = _data(args, ref, model, args.data)
        # the user's model, loss and held-out evaluation run here, before the long work
        check_data(model, data)
        float_evaluation = _evaluation(model, data, file_bytes(model), 1.0, 1.0)
        result = api.compress(
            model,
            data,
            method,
            budget,
            policy=policy,
            refinement=refinement,
            model_name=_model_name(ref),
            seed=args.seed,
            cache=_cache(args),
            progress=not args.no_progress,
            geometry=not args.no_geometry,
        )
        if args.weights:
            result.plan.metadata["float_weights"] = str(Path(args.weights).resolve())
        written = _write_artifact(staging, model, data, result.model, result.plan, float_evaluation)
        _keep_checkpoint(refinement, staging)
        if hf.is_hf_reference(ref):
            hf.save_architecture(ref, staging)
    _show_artifact(ref, f"{result.plan.method}, {budget.describe()}", out, *written)
    console.print(f"peak resident memory: {peak_memory() / 2**20:,.0f} MiB")


def _model_name(reference: str) -> str:
    """The plan's `model` field: a zoo name as is, a model file by its absolute path (for the
    record only: loading an artifact never imports it, the user passes the factory again)."""
    if not is_file_reference(reference):
        return reference
    path, _, factory = reference.rpartition(":")
    return f"{Path(path).resolve()}:{factory}"


def _write_artifact(
    staging: Path,
    model: nn.Module,
    data: Data,
    compressed: nn.Module,
    plan: Plan,
    float_evaluation: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Write the artifact, its evaluation (float and compressed) and report into `staging`;
    returns the evaluation and the weights file's bytes."""
    float_bytes = file_bytes(model)
    write_artifact(compressed, plan, staging)
    artifact_bytes = (staging / WEIGHTS).stat().st_size
    evaluation = {
        "float": float_evaluation or _evaluation(model, data, float_bytes, 1.0, 1.0),
        "compressed": _evaluation(
            compressed, data, artifact_bytes, plan.ratio, float_bytes / artifact_bytes
        ),
    }
    if distributed.is_main():
        write_json(staging / EVALUATION, evaluation)
        write_report(plan, evaluation, staging)
    return evaluation, artifact_bytes


def _keep_checkpoint(refinement: api.Refinement | None, staging: Path) -> None:
    """A refinement's checkpoint (kept in --out while it runs, so that a killed run resumes from
    it) goes into the new artifact too, so that a later `--resume` can run more steps."""
    folder = None if refinement is None else refinement.settings.get("checkpoint")
    if folder is not None and Path(folder).is_dir() and Path(folder).name == CHECKPOINT:
        shutil.copytree(folder, staging / CHECKPOINT)


def _show_artifact(
    ref: str, how: str, out: Path, evaluation: dict[str, dict[str, Any]], artifact_bytes: int
) -> None:
    _print_evaluation(f"{ref} (float)", evaluation["float"])
    _print_evaluation(f"{ref} ({how})", evaluation["compressed"])
    console.print(f"artifact: {out} ({artifact_bytes:,} bytes); report: {out / REPORT}")


def _refinement(
    args: argparse.Namespace, method: Method | None, out: Path, name: str | None = None
) -> api.Refinement | None:
    """The refinement `--refine` (or `name`), `--refine-epochs`, `--refine-lr`,
    `--refine-setting` and `--resume` ask for; None: the method's own. A refinement whose
    settings have a `checkpoint` keeps it in OUT/checkpoint."""
    settings: dict[str, Any] = {
        key: value
        for key, value in (("epochs", args.refine_epochs), ("lr", args.refine_lr))
        if value is not None
    }
    settings.update(parse_settings(args.refine_setting or (), "--refine-setting"))
    name = name or args.refine
    if method is None:
        refinement = api.Refinement(name, settings)
    else:
        refinement = api.Refinement.of(method, name, **settings)
    if refinement.name is None:
        if settings or args.resume:
            raise ConfigError(
                "the method runs no refinement to give settings to; name one with --refine"
            )
        return None
    fields = {f.name for f in dataclasses.fields(get_refiner(refinement.name).settings)}
    if "checkpoint" in fields and "checkpoint" not in refinement.settings:
        refinement.settings["checkpoint"] = str(out / CHECKPOINT)
    if args.resume:
        if "resume" not in fields:
            raise ConfigError(f"refinement {refinement.name!r} keeps no checkpoint to resume")
        refinement.settings["resume"] = True
    return refinement


def parse_settings(texts: Iterable[str], option: str) -> dict[str, Any]:
    """Settings from KEY=VALUE texts (`option`'s values), each value a JSON number,
    true/false/null, or else the text itself (a word, such as an optimiser's name);
    `ConfigError` naming `option` for a text that is not KEY=VALUE."""
    settings: dict[str, Any] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} {text!r}: expected KEY=VALUE, e.g. steps=10")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def cmd_refine(args: argparse.Namespace) -> None:
    target, out = Path(args.artifact), Path(args.out)
    if not target.is_dir():
        raise ArtifactError(f"{target} is not an artifact directory (made by `allot compress`)")
    if out.resolve() == target.resolve():
        raise ArtifactError("--out must be another directory than the artifact being refined")
    name = "lc" if args.lc else args.refine
    if name is None:
        raise ConfigError("name the refinement: --lc, or --refine NAME")
    refinement = _refinement(args, None, out, name)
    assert refinement is not None
    inputs = [target, *_inputs(args, args.model_file)]
    with _staged(out, is_artifact_file, inputs, ArtifactError) as staging:
        compressed, plan = _load_artifact(args, target)
        reference = _artifact_reference(args, plan)
        data = _data(args, _source(args, plan, target), reference, args.data or _zoo_dataset(plan))
        check_data(reference, data)
        float_evaluation = _evaluation(reference, data, file_bytes(reference), 1.0, 1.0)
        api.refine_model(
            compressed, plan, reference, data, refinement, progress=not args.no_progress
        )
        written = _write_artifact(staging, reference, data, compressed, plan, float_evaluation)
        _keep_checkpoint(refinement, staging)
        if hf.is_hf_reference(plan.model):
            hf.save_architecture(_source(args, plan, target), staging)
    _show_artifact(plan.model, f"refined by {name}", out, *written)


def cmd_evaluate(args: argparse.Namespace) -> None:
    target = Path(args.target)
    if (args.latency or args.kernels or args.cache_weights) and args.device.type != "cpu":
        raise ConfigError("--latency, --kernels and --cache-weights run on the CPU; drop --device")
    if target.is_dir():
        model, plan = _load_artifact(args, target)
        reference = _artifact_reference(args, plan)
        fast = args.kernels or args.cache_weights
        if fast:
            runtime.prepare(model, kernels=args.kernels, cache=args.cache_weights)
        data = _data(args, _source(args, plan, target), reference, args.data or _zoo_dataset(plan))
        size = (target / WEIGHTS).stat().st_size
        result = _evaluation(
            model, data, size, plan.ratio, file_bytes(reference) / size, args.latency, reference
        )
        if fast:  # after the calls, by which low-rank layers have chosen their forms
            layout = list(runtime.describe(model).values())
            counts = {label: layout.count(label) for label in set(layout)}
            console.print("runtime: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        _print_evaluation(f"{target} ({plan.method} on {plan.model})", result)
    else:
        if not is_file_reference(args.target) and target.exists():
            raise ArtifactError(f"{target} is not an artifact directory")
        if args.kernels or args.cache_weights:
            raise AllotError("--kernels and --cache-weights apply to an artifact directory")
        model = float_model(args.target, args.weights).to(args.device)
        data = _data(args, args.target, model, args.data)
        result = _evaluation(model, data, file_bytes(model), 1.0, 1.0, args.latency, model)
        _print_evaluation(f"{args.target} (float)", result)


def _load_artifact(args: argparse.Namespace, target: Path) -> tuple[nn.Module, Plan]:
    """An artifact rebuilt on the architecture of the user's --model, of its own hf/ folder (a
    Hugging Face model), or of the zoo model it names (never on code the artifact names), on
    --device."""
    model, plan = _read_artifact(args, target)
    return model.to(getattr(args, "device", "cpu")), plan


def _read_artifact(args: argparse.Namespace, target: Path) -> tuple[nn.Module, Plan]:
    plan = read_plan(target)
    if args.model_file is not None:
        if hf.is_hf_reference(args.model_file):
            return load(target, hf.architecture(args.model_file.removeprefix(hf.PREFIX)))
        factory = file_factory(args.model_file)
        return load(target, lambda: build(factory, args.model_file))
    if hf.is_hf_reference(plan.model):
        return load(target, hf.architecture(target / hf.FOLDER))
    return load(target)


def _source(args: argparse.Namespace, plan: Plan, target: Path) -> str:
    """The model reference an artifact's data is read for: a Hugging Face artifact's tokenizer is
    its own hf/ folder's (or the user's --model hf:PATH)."""
    if args.model_file is None and hf.is_hf_reference(plan.model):
        return hf.PREFIX + str(target / hf.FOLDER)
    return args.model_file or plan.model


def _artifact_reference(args: argparse.Namespace, plan: Plan) -> nn.Module:
    """The float model an artifact is compared with, on --device."""
    return _reference(args, plan).to(args.device)


def _reference(args: argparse.Namespace, plan: Plan) -> nn.Module:
    """The float model an artifact is compared with: the zoo model it names, or the user's own
    --model (FILE.py:FACTORY with --weights, or hf:PATH); an artifact's recorded paths are never
    opened."""
    if args.model_file is None and hf.is_hf_reference(plan.model):
        raise ArtifactError(
            "give --model hf:PATH, the float model to compare the artifact with (its recorded "
            "path is not opened)"
        )
    if args.model_file is not None:
        if hf.is_hf_reference(args.model_file):
            return float_model(args.model_file)
        if args.weights is None:
            raise ArtifactError(
                "--model FILE.py:FACTORY needs --weights, the float weights to compare with"
            )
        return float_model(args.model_file, args.weights)
    return float_model(plan.model, args.weights)


def _zoo_dataset(plan: Plan) -> str | None:
    """The zoo data set a plan was made on, when it names one (user data must be given again)."""
    from allot.zoo import DATASETS

    name = plan.metadata.get("dataset")
    if isinstance(name, str) and name in DATASETS:
        return name
    if is_file_reference(plan.model) or hf.is_hf_reference(plan.model):
        raise DataError("the artifact was made on your own data: give it again with --data")
    return None


def cmd_analyze(args: argparse.Namespace) -> None:
    from allot.errors import get_error_model
    from allot.report.markdown import write_sensitivity

    method = get_method(args.method)
    get_error_model(args.error_model)
    # --out is checked (and its staging directory made) before the long work
    output = (
        _staged(Path(args.out), ANALYSIS_FILES.__contains__, _inputs(args, args.model), ConfigError)
        if args.out
        else contextlib.nullcontext()
    )
    with output as staging:
        result = _analysis(args, method)
        if staging is not None:
            write_sensitivity(result, f"{args.model} ({method.name} grid)", staging)
    if args.out:
        console.print(f"analysis: {Path(args.out) / 'analysis.md'}")


def _analysis(args: argparse.Namespace, method: Method) -> Sensitivity:
    """Profile the model, score its grid, and print the curvature and damage tables."""
    from allot.profile.engine import Settings
    from allot.sensitivity import analyze

    model = float_model(args.model, args.weights).to(args.device)
    data = _data(args, args.model, model, args.data)
    work, _pairs, discovery, _notes = api.prepare(model)
    profile = api.profile(
        work,
        discovery,
        data,
        settings=Settings(
            probes_min=min(8, args.probes),
            probes_max=args.probes,
            lanczos_iterations=args.lanczos,
            seed=args.seed,
        ),
        cache=_cache(args),
        progress=not args.no_progress,
    )
    result = analyze(profile, method.grid, args.error_model, not args.no_progress)
    curvature = Table(title=f"{args.model}: curvature of the calibration loss per layer")
    for column in ("layer", "weights", "|g|", "trace", "± se", "top eig", "min eig"):
        curvature.add_column(column, justify="left" if column == "layer" else "right")
    for row in result.layers:
        curvature.add_row(
            row.name + (" (saddle)" if row.saddle else ""),
            f"{row.weights:,}",
            *(
                f"{value:.3g}"
                for value in (
                    row.gradient_norm,
                    row.trace,
                    row.trace_stderr,
                    row.top_eigenvalue,
                    row.bottom_eigenvalue,
                )
            ),
        )
    console.print(curvature)
    labels = list(dict.fromkeys(k for row in result.layers for k in row.candidates))
    damage = Table(title=f"predicted damage per candidate ({args.error_model} error model)")
    damage.add_column("layer")
    for label in labels:
        damage.add_column(label.replace("quant", "q"), justify="right")
    for row in result.layers:
        damage.add_row(
            row.name,
            *(f"{row.candidates[k][1]:.1e}" if k in row.candidates else "" for k in labels),
        )
    console.print(damage)
    console.print(
        f"cost: {result.fb_equivalents} forward+backward equivalents over "
        f"{data.samples()} calibration samples, {result.seconds:.1f} s, peak resident memory "
        f"{result.peak_memory_bytes / 2**20:,.0f} MiB"
    )
    return result


def cmd_export(args: argparse.Namespace) -> None:
    from allot.export import export
    from allot.export.onnx import run_onnx

    target = Path(args.artifact)
    if not target.is_dir():
        raise ArtifactError(f"{target} is not an artifact directory")
    model, plan = _load_artifact(args, target)
    out = Path(args.out)
    if args.format == "torchao":
        path = export(model, plan, "torchao", out, architecture=_architecture(args, plan, target))
        console.print(f"torchao state dict: {path} ({path.stat().st_size:,} bytes)")
        return
    inputs = _example_inputs(args, plan, target, model)
    path = export(model, plan, "onnx", out, inputs=inputs)
    with torch.no_grad():
        expected = forward(model, inputs)
    got = torch.from_numpy(run_onnx(path, inputs)[0])
    difference = float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-30))
    if not difference <= ONNX_TOLERANCE:
        raise ExportError(
            f"onnxruntime's output differs from allot's by {difference:.2e} (relative), above "
            f"{ONNX_TOLERANCE:g}; the export is not usable"
        )
    size, artifact = path.stat().st_size, (target / WEIGHTS).stat().st_size
    console.print(
        f"ONNX: {path} ({size:,} bytes, {size / artifact:.3f}x the artifact's weights file); "
        f"onnxruntime matches allot within {difference:.1e} (max relative difference)"
    )


def _architecture(args: argparse.Namespace, plan: Plan, target: Path):
    """The float architecture (a factory) an artifact was compressed from, never from code the
    artifact names."""
    if args.model_file is not None:
        if hf.is_hf_reference(args.model_file):
            return hf.architecture(args.model_file.removeprefix(hf.PREFIX))
        factory = file_factory(args.model_file)
        return lambda: build(factory, args.model_file)
    if hf.is_hf_reference(plan.model):
        return hf.architecture(target / hf.FOLDER)
    return zoo_factory(plan.model)


def _example_inputs(args: argparse.Namespace, plan: Plan, target: Path, model: nn.Module):
    """Two samples of inputs to trace an export on: from --data (text lines for a Hugging Face
    model, a tensor file, FILE.py:FACTORY or a zoo data set), or from the zoo model's data."""
    source, data = _source(args, plan, target), args.data
    if hf.is_hf_reference(source):
        lines = hf.read_lines(data, 2) if data else ["A line to trace the model on.", "Another."]
        return hf.batches(lines, hf.tokenizer(source.removeprefix(hf.PREFIX)))[0]
    if data is not None and is_tensor_file(data):
        return tensor_batches(data, "distill", 2, 2)[0][0]
    if data is not None and is_file_reference(data):
        return user_data(data, model, args.loss, calibration=2).example_inputs(2)
    if data is not None:
        return zoo_data(data, 8, 0).example_inputs(2)
    if is_file_reference(source):
        raise DataError("give --data: example inputs to trace the model on")
    return zoo_data_of(source, 8, 0).example_inputs(2)


def cmd_report(args: argparse.Namespace) -> None:
    directory = Path(args.directory)
    plan: Plan = read_plan(directory)
    evaluation_path = directory / EVALUATION
    evaluation = read_json(evaluation_path, ArtifactError) if evaluation_path.exists() else {}
    if not isinstance(evaluation, dict) or not all(
        isinstance(v, dict) for v in evaluation.values()
    ):
        raise ArtifactError(f"{evaluation_path}: expected an object of evaluations by model")
    console.print(f"report: {write_report(plan, evaluation, directory)}")


def cmd_zoo(args: argparse.Namespace) -> None:
    from allot.zoo import MODELS

    if args.zoo_command == "list":
        table = Table(title="allot zoo")
        for column in ("model", "data set", "checkpoint", "description"):
            table.add_column(column)
        for name, entry in sorted(MODELS.items()):
            sidecar = entry.checkpoint.with_suffix(".json")
            if entry.pretrained is not None:
                status = "pretrained package"
            elif sidecar.exists():
                recorded = json.loads(sidecar.read_text()).get("metrics", {})
                status = ", ".join(
                    f"{k} {recorded[k]:.4f}" for k in ("accuracy", "fidelity") if k in recorded
                )
            else:
                status = "not trained"
            table.add_row(name, entry.dataset, status, entry.description)
        console.print(table)
        return
    from allot.zoo.train import save_checkpoint, train_model

    model, result = train_model(args.name, epochs=args.epochs, progress=not args.no_progress)
    path = save_checkpoint(
        args.name, model, result, **({"directory": Path(args.out)} if args.out else {})
    )
    console.print(f"trained {args.name}: {result}; checkpoint: {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    """`allot compress mnist-resnet20 --method uniform-quant --bits 4 --out OUT`, parsed by the
    compress command's own parser (so it has every compress option's default), with the demo's
    global options (threads, progress, ...)."""
    argv = ["compress", "mnist-resnet20", "--method", "uniform-quant", "--bits", "4"]
    compress = parser().parse_args([*argv, "--out", args.out])
    for key, value in vars(args).items():
        if key not in ("command", "func"):
            setattr(compress, key, value)
    cmd_compress(compress)


def _add_budget(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "budget",
        "exactly one; a method with a budget of its own (lowrank-compact: --lossless) "
        "runs under it when none is given",
    ).add_mutually_exclusive_group()
    group.add_argument("--bits", type=int, help="the size of B-bit quantization of every layer")
    group.add_argument("--ratio", type=float, help="compression ratio of the compressible weights")
    group.add_argument(
        "--avg-bits", type=float, help="average stored bits per weight (metadata incl.)"
    )
    group.add_argument("--bytes", type=float, help="bytes of all parameters after compression")
    group.add_argument(
        "--max-damage",
        type=float,
        help="smallest plan whose predicted damage (error-model units) is at most this",
    )
    group.add_argument(
        "--lossless",
        action="store_true",
        help="smallest plan whose calibration loss is not above the float model's",
    )
    group.add_argument(
        "--max-loss-increase",
        type=float,
        metavar="L",
        help="smallest plan whose measured calibration loss is at most the float model's + L",
    )
    parser.add_argument(
        "--macs-ratio",
        type=float,
        metavar="M",
        help="with a size budget, also execute at most 1/M of the float model's multiply-"
        "accumulates in the compressible layers (knapsack methods)",
    )


def _add_refine_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--refine-epochs", type=_at_least(0), help="epochs of a refinement that trains"
    )
    parser.add_argument("--refine-lr", type=float, help="learning rate of a refinement that trains")
    parser.add_argument(
        "--refine-setting",
        action="append",
        metavar="KEY=VALUE",
        help="any setting of the refinement, e.g. steps=10 or optimizer=sgd (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the refinement from its checkpoint in --out (LC)",
    )


def _add_source(parser: argparse.ArgumentParser, calibration: bool = True) -> None:
    parser.add_argument("--weights", help="safetensors weights for a FILE.py:FACTORY model")
    parser.add_argument(
        "--data",
        help="zoo data set (default: the zoo model's own), your FILE.py:FACTORY (returning "
        "allot.Data, or batches with --loss), or a .npz/.safetensors file of inputs and targets",
    )
    parser.add_argument("--loss", choices=LOSSES, help="loss of your own --data's batches")
    parser.add_argument(
        "--held-out", help=".npz/.safetensors file of held-out inputs and targets for your --data"
    )
    if calibration:
        parser.add_argument(
            "--calibration", type=_at_least(1), default=512, help="calibration samples"
        )
        parser.add_argument(
            "--seed", type=_seed, default=0, help="seed of calibration subset and fitting"
        )
        parser.add_argument(
            "--no-cache", action="store_true", help="recompute profile statistics (no disk cache)"
        )


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model and batches run: cpu (default), cuda, cuda:1, mps; under torchrun "
        "cuda means cuda:LOCAL_RANK",
    )


def _device(text: str) -> torch.device:
    """--device as a torch device; `ConfigError` naming the flag when it is not one or is not
    available here."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"--device {text!r:.40} is not a device; use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {text}: this torch has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {text}: there are {count} CUDA devices (cuda:0..)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ConfigError(f"--device {text}: allot runs on cpu, cuda or mps")
    return device


class _UsageError(Exception):
    """A command line argparse refuses; its message is the one line to print."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), raised to `main` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {' '.join(message.split())}")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r:.40}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _seed(text: str) -> int:
    """An argparse type: a seed, an int in 0..2**63 - 1 (what torch's generators accept)."""
    value = _at_least(0)(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="allot", description=__doc__.splitlines()[0])
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    top.add_argument("--threads", type=_at_least(1), default=None, help="torch CPU threads")
    top.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model under a budget and write an artifact")
    p.add_argument("model", nargs="?", help="zoo model name (see `allot zoo list`)")
    p.add_argument("--model", dest="model_file", metavar="FILE.py:FACTORY", help="your own model")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--out", required=True, help="artifact directory")
    p.add_argument(
        "--refine",
        choices=sorted(REFINERS),
        help="refinement after the plan is applied (default: the method's own, if any)",
    )
    _add_refine_settings(p)
    p.add_argument(
        "--scheme",
        metavar="SCHEME",
        help="one scheme for every layer, e.g. 'quant:1+sparse:0.02' (a pin on all layers, "
        "before --keep and --pin; no budget needed)",
    )
    p.add_argument(
        "--keep",
        action="append",
        metavar="PATTERN",
        help="keep layers whose name matches this glob in float (repeatable)",
    )
    p.add_argument(
        "--pin",
        action="append",
        metavar="PATTERN=SCHEME",
        help="give layers matching the glob this scheme, e.g. 'fc=quant:8' (repeatable; "
        "applied after --keep, later ones win)",
    )
    p.add_argument(
        "--screen",
        type=_screen_margin,
        metavar="MARGIN",
        help="score only candidates that no other candidate of their layer storing no more beats "
        "by more than MARGIN (>= 1) times in output error |dW x|^2 (saves the passes of the "
        "measured error model; default: the method's own, usually none)",
    )
    p.add_argument(
        "--no-geometry",
        action="store_true",
        help="leave the error geometry out of the report of a curvature method (saves its "
        "Lanczos sweeps: a third to a half of the passes of cet on the zoo models)",
    )
    _add_budget(p)
    _add_source(p)
    _add_device(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "refine", help="refine an artifact's compressed model (LC) and write a new artifact"
    )
    p.add_argument("artifact", help="artifact directory made by `allot compress`")
    p.add_argument("--out", required=True, help="directory of the refined artifact")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--lc", action="store_true", help="learning-compression toward the artifact's plan"
    )
    which.add_argument("--refine", choices=sorted(REFINERS), help="another refinement")
    _add_refine_settings(p)
    p.add_argument(
        "--model",
        dest="model_file",
        metavar="FILE.py:FACTORY",
        help="the architecture of an artifact made from your own model (with --weights)",
    )
    _add_source(p)
    _add_device(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("evaluate", help="evaluate an artifact directory or a float zoo model")
    p.add_argument("target", help="artifact directory, zoo model name, or FILE.py:FACTORY")
    p.add_argument(
        "--model",
        dest="model_file",
        metavar="FILE.py:FACTORY",
        help="the architecture of an artifact made from your own model (never read from the artifact)",
    )
    p.add_argument("--latency", action="store_true", help="measure CPU latency vs the float model")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="run quantized Linear layers on low-bit kernels where their layout allows "
        "(bfloat16 activations; allot.runtime)",
    )
    p.add_argument(
        "--cache-weights",
        action="store_true",
        help="keep every other compressed layer's dense weight (float memory and speed), and run "
        "each low-rank layer in the faster of its factors and their dense product (timed on "
        "the first call)",
    )
    _add_source(p, calibration=False)
    _add_device(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("analyze", help="per-layer curvature and predicted damage of candidates")
    p.add_argument("model")
    p.add_argument(
        "--method", default="uniform-quant", choices=sorted(METHODS), help="whose scheme grid"
    )
    p.add_argument(
        "--error-model", default="second-order", choices=sorted(ERROR_MODELS), help="damage model"
    )
    p.add_argument("--probes", type=_at_least(2), default=16, help="most Hutchinson probes (trace)")
    p.add_argument("--lanczos", type=_at_least(1), default=4, help="Lanczos iterations per layer")
    p.add_argument("--out", help="directory for analysis.md, analysis.json and plots")
    _add_source(p)
    _add_device(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "export", help="write an artifact as ONNX (QDQ) or a torchao state dict (docs/export.md)"
    )
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument(
        "--model",
        dest="model_file",
        metavar="FILE.py:FACTORY | hf:PATH",
        help="the architecture of an artifact made from your own model (never read from the artifact)",
    )
    _add_source(p, calibration=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="(re)write report.md and plots of an artifact")
    p.add_argument("directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("zoo", help="list or train the benchmark models")
    zoo = p.add_subparsers(dest="zoo_command", required=True)
    zoo.add_parser("list", help="registered models and their checkpoints")
    t = zoo.add_parser("train", help="train a zoo model and write its checkpoint")
    t.add_argument("name")
    t.add_argument("--epochs", type=_at_least(1), default=None)
    t.add_argument("--out", default=None, help="checkpoint directory (default: the package's)")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("demo", help="compress mnist-resnet20 with uniform 4-bit quantization")
    p.add_argument("--out", default="demo-out")
    _add_device(p)
    p.set_defaults(func=cmd_demo)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run the `allot` command; returns its exit code (0, 2 for refused input or a failed write,
    130 for an interrupt)."""
    try:
        args = parser().parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.showwarning = _warning_line
        try:
            if hasattr(args, "device"):
                args.device = distributed.start(_device(args.device))
                stack.callback(distributed.stop)
                if not distributed.is_main():  # the other ranks compute, rank 0 speaks
                    silent = stack.enter_context(open(os.devnull, "w"))
                    stack.enter_context(contextlib.redirect_stdout(silent))
                    warnings.simplefilter("ignore")
            args.func(args)
        except (AllotError, OSError, KeyboardInterrupt) as exc:
            if args.debug:
                raise
            if isinstance(exc, KeyboardInterrupt):
                print(
                    "allot: interrupted; an output not yet complete was discarded", file=sys.stderr
                )
                return 130
            print(f"allot: error: {_one_line(exc)}", file=sys.stderr)
            return 2
    return 0


def _one_line(exc: BaseException) -> str:
    """An error's message on one line; a file-system error with the file it concerns."""
    if isinstance(exc, OSError) and not isinstance(exc, AllotError):
        text = exc.strerror or str(exc)
        if exc.filename is not None:
            text = f"{exc.filename}: {text}"
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _warning_line(message: Warning | str, category: type[Warning], *_args: Any) -> None:
    print(f"allot: warning: {_one_line(Warning(str(message)))}", file=sys.stderr)


if __name__ == "__main__":
    from allot_main import leave

    leave(main())

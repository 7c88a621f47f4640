"""The `allot` command: compress, refine, evaluate, analyze, report, zoo, demo.

Every `AllotError` becomes one line on stderr and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from allot import api
from allot.budget import Budget
from allot.data import Data
from allot.errors import ERROR_MODELS
from allot.evaluate import file_bytes, latencies, macs, metrics, parameter_count
from allot.exceptions import AllotError, ArtifactError, ConfigError, DataError
from allot.files import read_json, write_json
from allot.io import WEIGHTS, load, read_plan, save
from allot.methods import METHODS, Method, get_method
from allot.plan import Plan
from allot.policy import Policy
from allot.profile.cache import Cache, default_directory
from allot.profile.measure import mean_loss
from allot.refine import REFINERS, get_refiner
from allot.report.markdown import write_report
from allot.source import (
    LOSSES,
    build,
    file_factory,
    float_model,
    is_file_reference,
    is_tensor_file,
    user_data,
    zoo_data,
    zoo_data_of,
)

EVALUATION = "evaluation.json"
console = Console()


def _data(args: argparse.Namespace, model_ref: str, model: nn.Module, data: str | None) -> Data:
    """The data a command runs on: the zoo model's own data set, a zoo data set named by --data,
    or the user's data factory or tensor file (with --loss and --held-out)."""
    calibration, seed = getattr(args, "calibration", 512), getattr(args, "seed", 0)
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
    if args.lossless:
        return Budget("lossless")
    if args.max_damage is not None:
        return Budget("damage", args.max_damage)
    for kind in ("ratio", "avg_bits", "bytes", "bits"):
        value = getattr(args, kind)
        if value is not None:
            return Budget(kind, value)
    if default is not None:
        return default
    raise AllotError(
        "give a budget: --bits, --ratio, --avg-bits, --bytes, --max-damage or --lossless"
    )


def cmd_compress(args: argparse.Namespace) -> None:
    ref = args.model_file or args.model
    if ref is None:
        raise AllotError("name a zoo model (see `allot zoo list`) or give --model FILE.py:FACTORY")
    if args.model_file and args.model:
        raise AllotError("give either a zoo model name or --model FILE.py:FACTORY, not both")
    # --scheme gives every layer one scheme, which fixes the size: the budget then only checks
    # it, by default that the plan is no larger than float.
    budget = _budget(args, Budget("ratio", 1.0) if args.scheme else None)
    # --scheme's catch-all pin comes first, so that --keep and --pin refine it
    scheme = Policy.parse((), [f"*={args.scheme}"] if args.scheme else ())
    policy = Policy((*scheme.rules, *Policy.parse(args.keep or (), args.pin or ()).rules))
    refinement = _refinement(args, get_method(args.method), Path(args.out))
    model = float_model(ref, args.weights)
    data = _data(args, ref, model, args.data)
    result = api.compress(
        model,
        data,
        args.method,
        budget,
        policy=policy,
        refinement=refinement,
        model_name=ref,
        seed=args.seed,
        cache=_cache(args),
        progress=not args.no_progress,
    )
    if args.weights:
        result.plan.metadata["float_weights"] = str(Path(args.weights).resolve())
    _write_artifact(ref, model, data, result.model, result.plan, Path(args.out), budget.describe())


def _write_artifact(
    ref: str, model: nn.Module, data: Data, compressed: nn.Module, plan: Plan, out: Path, how: str
) -> None:
    """Save the artifact, its evaluation (float and compressed) and report, and print them."""
    float_bytes = file_bytes(model)
    out = save(compressed, plan, out)
    artifact_bytes = (out / WEIGHTS).stat().st_size
    evaluation = {
        "float": _evaluation(model, data, float_bytes, 1.0, 1.0),
        "compressed": _evaluation(
            compressed, data, artifact_bytes, plan.ratio, float_bytes / artifact_bytes
        ),
    }
    write_json(out / EVALUATION, evaluation)
    report = write_report(plan, evaluation, out)
    _print_evaluation(f"{ref} (float)", evaluation["float"])
    _print_evaluation(f"{ref} ({plan.method}, {how})", evaluation["compressed"])
    console.print(f"artifact: {out} ({artifact_bytes:,} bytes); report: {report}")


CHECKPOINT = "checkpoint"
"""Where a refinement that checkpoints (a settings field `checkpoint`) keeps its state in --out."""


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
    for text in args.refine_setting or ():
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"--refine-setting {text!r}: expected KEY=VALUE, e.g. steps=10")
        settings[key] = _setting_value(value)
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


def _setting_value(text: str) -> Any:
    """A --refine-setting value: a JSON number, true/false/null, or else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_refine(args: argparse.Namespace) -> None:
    target, out = Path(args.artifact), Path(args.out)
    if not target.is_dir():
        raise ArtifactError(f"{target} is not an artifact directory (made by `allot compress`)")
    if out.resolve() == target.resolve():
        raise ArtifactError("--out must be another directory than the artifact being refined")
    name = "lc" if args.lc else args.refine
    if name is None:
        raise ConfigError("name the refinement: --lc, or --refine NAME")
    plan = read_plan(target)
    if args.model_file is not None:
        factory = file_factory(args.model_file)
        compressed, plan = load(target, lambda: build(factory, args.model_file))
    else:
        compressed, plan = load(target)
    reference = _artifact_reference(args, plan)
    data = _data(args, plan.model, reference, args.data or _zoo_dataset(plan))
    refinement = _refinement(args, None, out, name)
    assert refinement is not None
    api.refine_model(compressed, plan, reference, data, refinement, progress=not args.no_progress)
    _write_artifact(plan.model, reference, data, compressed, plan, out, f"refined by {name}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    target = Path(args.target)
    if target.is_dir():
        plan = read_plan(target)
        if args.model_file is not None:
            factory = file_factory(args.model_file)
            model, plan = load(target, lambda: build(factory, args.model_file))
        else:
            model, plan = load(target)
        reference = _artifact_reference(args, plan)
        data = _data(args, plan.model, reference, args.data or _zoo_dataset(plan))
        size = (target / WEIGHTS).stat().st_size
        result = _evaluation(
            model, data, size, plan.ratio, file_bytes(reference) / size, args.latency, reference
        )
        _print_evaluation(f"{target} ({plan.method} on {plan.model})", result)
    else:
        if not is_file_reference(args.target) and target.exists():
            raise ArtifactError(f"{target} is not an artifact directory")
        model = float_model(args.target, args.weights)
        data = _data(args, args.target, model, args.data)
        result = _evaluation(model, data, file_bytes(model), 1.0, 1.0, args.latency, model)
        _print_evaluation(f"{args.target} (float)", result)


def _artifact_reference(args: argparse.Namespace, plan: Plan) -> nn.Module:
    """The float model an artifact is compared with: the zoo model it names, or the user's own
    --model with --weights (an artifact's recorded paths are never opened)."""
    if args.model_file is not None:
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
    if is_file_reference(plan.model):
        raise DataError("the artifact was made on your own data: give it again with --data")
    return None


def cmd_analyze(args: argparse.Namespace) -> None:
    from allot.errors import get_error_model
    from allot.profile.engine import Settings
    from allot.report.markdown import write_sensitivity
    from allot.sensitivity import analyze

    method = get_method(args.method)
    get_error_model(args.error_model)
    model = float_model(args.model, args.weights)
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
        f"{data.samples()} calibration samples, {result.seconds:.1f} s"
    )
    if args.out:
        path = write_sensitivity(result, f"{args.model} ({method.name} grid)", Path(args.out))
        console.print(f"analysis: {path}")


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
    args.model, args.model_file, args.weights, args.data = "mnist-resnet20", None, None, None
    args.loss, args.held_out, args.keep, args.pin = None, None, None, None
    args.refine, args.refine_epochs, args.refine_lr = None, None, None
    args.refine_setting, args.resume, args.scheme = None, False, None
    args.method, args.lossless, args.ratio, args.avg_bits, args.bytes = (
        "uniform-quant",
        False,
        None,
        None,
        None,
    )
    args.bits, args.calibration, args.seed, args.no_cache = 4, 512, 0, False
    args.max_damage = None
    cmd_compress(args)


def _add_budget(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
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


def _add_refine_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refine-epochs", type=int, help="epochs of a refinement that trains")
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
        parser.add_argument("--calibration", type=int, default=512, help="calibration samples")
        parser.add_argument(
            "--seed", type=int, default=0, help="seed of calibration subset and fitting"
        )
        parser.add_argument(
            "--no-cache", action="store_true", help="recompute profile statistics (no disk cache)"
        )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="allot", description=__doc__.splitlines()[0])
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    top.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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
    _add_budget(p)
    _add_source(p)
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
    _add_source(p, calibration=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("analyze", help="per-layer curvature and predicted damage of candidates")
    p.add_argument("model")
    p.add_argument(
        "--method", default="uniform-quant", choices=sorted(METHODS), help="whose scheme grid"
    )
    p.add_argument(
        "--error-model", default="second-order", choices=sorted(ERROR_MODELS), help="damage model"
    )
    p.add_argument("--probes", type=int, default=16, help="most Hutchinson probes (trace)")
    p.add_argument("--lanczos", type=int, default=4, help="Lanczos iterations per layer")
    p.add_argument("--out", help="directory for analysis.md, analysis.json and plots")
    _add_source(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="(re)write report.md and plots of an artifact")
    p.add_argument("directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("zoo", help="list or train the benchmark models")
    zoo = p.add_subparsers(dest="zoo_command", required=True)
    zoo.add_parser("list", help="registered models and their checkpoints")
    t = zoo.add_parser("train", help="train a zoo model and write its checkpoint")
    t.add_argument("name")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--out", default=None, help="checkpoint directory (default: the package's)")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("demo", help="compress mnist-resnet20 with uniform 4-bit quantization")
    p.add_argument("--out", default="demo-out")
    p.set_defaults(func=cmd_demo)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except AllotError as exc:
        if args.debug:
            raise
        print(f"allot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

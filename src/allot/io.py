"""Artifacts: a directory with `model.safetensors` (the compressed model's tensors) and `plan.json`.

An artifact directory is written whole or not at all (`allot.files.staged_directory`): the files go
into a fresh sibling that then takes the directory's place in one atomic step, so an interrupt
leaves the old artifact or the new one, never a mix. The plan records the weights file's size and
SHA-256, so a torn or replaced weights file is detected on load instead of giving wrong outputs.
Nothing is ever unpickled.

An artifact is untrusted input: loading one never runs code it names. The float architecture comes
from the caller's `model_factory`, or, for a plan made from a zoo model, from the zoo (allot's own
code); a plan that names a model file is refused unless the caller passes the factory. Every
stored tensor is checked before the model is returned: its name, shape and dtype against the
plan's modules, then its values (finite floats, sparse positions in range: each compressed
layer's `check_state`).
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from allot.apply import apply_structure
from allot.exceptions import AllotError, ArtifactError, PlanError
from allot.files import atomic_write, read_json, save_weights, staged_directory
from allot.hf import FOLDER as HF_FOLDER
from allot.modules.base import CompressedLayer
from allot.plan import Plan
from allot.source import build, zoo_factory
from allot.state import matched_state

WEIGHTS = "model.safetensors"
PLAN = "plan.json"
CHECKPOINT = "checkpoint"
"""The folder of `--out` where a refinement that checkpoints (LC) keeps its state until the
artifact is written."""
ARTIFACT_FILES = frozenset(
    {
        WEIGHTS,
        PLAN,
        "evaluation.json",
        "report.md",
        "allocation.png",
        "damage.png",
        "pareto.png",
        CHECKPOINT,
        "report.html",
        HF_FOLDER,
    }
)
"""Every name allot writes into an artifact directory; `--out` may hold nothing else (allot never
deletes a file it did not write)."""


def is_artifact_file(name: str) -> bool:
    return name in ARTIFACT_FILES


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_artifact(model: nn.Module, plan: Plan, directory: Path) -> None:
    """Write weights, then the plan naming their size and digest, into an existing directory
    (each file atomically). `save` wraps this in a staged directory."""
    weights = Path(directory) / WEIGHTS
    save_weights(model, weights)
    plan.metadata["artifact"] = {
        "file": WEIGHTS,
        "bytes": weights.stat().st_size,
        "sha256": _digest(weights),
    }
    atomic_write(Path(directory) / PLAN, plan.dumps().encode())


def save(model: nn.Module, plan: Plan, directory: str | Path, inputs: Iterable[Path] = ()) -> Path:
    """Write a compressed model and its plan as an artifact directory, replacing any artifact
    there whole; returns the directory. `ArtifactError` when `directory` is a file, holds files
    allot does not write, contains one of `inputs`, or cannot be written."""
    with staged_directory(Path(directory), is_artifact_file, inputs, ArtifactError) as staging:
        write_artifact(model, plan, staging)
    return Path(directory)


def read_plan(directory: str | Path) -> Plan:
    """The validated plan of an artifact directory (or of a plan.json path)."""
    path = Path(directory)
    if path.is_dir():
        path = path / PLAN
    if not path.exists():
        raise ArtifactError(
            f"{path} does not exist; pass an artifact directory made by `allot compress`"
        )
    data = read_json(path, PlanError)
    try:
        return Plan.from_json(data)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from exc


def _check_weights_file(weights: Path, plan: Plan, directory: Path) -> None:
    """The weights file is a regular file whose size and digest are the plan's."""
    info = plan.metadata.get("artifact")
    if not weights.exists():
        raise ArtifactError(f"{weights} is missing; the artifact is incomplete")
    try:
        mode = weights.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"{weights} is not a regular file")
        fits = (
            isinstance(info, dict)
            and info.get("bytes") == weights.stat().st_size
            and info.get("sha256") == _digest(weights)
        )
    except OSError as exc:
        raise ArtifactError(f"cannot read {weights}: {exc.strerror or exc}") from exc
    if not fits:
        raise ArtifactError(
            f"{weights} does not match {directory / PLAN} (truncated, corrupt or replaced); "
            "compress again"
        )


def check_tensors(model: nn.Module, plan: Plan, where: str) -> None:
    """`ArtifactError` naming the layer and tensor when a loaded model holds values no artifact
    allot writes can: non-finite parameters, or a compressed layer's state out of range."""
    for layer in plan.layers:
        module = model.get_submodule(layer.name)
        if isinstance(module, CompressedLayer):
            try:
                module.check_state()
            except AllotError as exc:
                raise ArtifactError(
                    f"{where}: layer {layer.name} ({layer.scheme.label()}): {exc}"
                ) from exc
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all()):
            raise ArtifactError(f"{where}: {name} holds NaN or infinite values")


def load(
    directory: str | Path, model_factory: Callable[[], nn.Module] | None = None
) -> tuple[nn.Module, Plan]:
    """Rebuild a compressed model from an artifact, without the original weights.

    `model_factory` builds the float architecture (any weights; they are all overwritten). When
    omitted, the plan must name a zoo model, whose architecture the zoo builds: a plan that names
    a model file is refused, since loading never runs code an artifact names. Every stored
    tensor is checked (names, shapes, dtypes, then values) before the model is returned.
    Returns (model in eval mode, plan).
    """
    directory = Path(directory)
    plan = read_plan(directory)
    weights = directory / WEIGHTS
    _check_weights_file(weights, plan, directory)
    factory = model_factory or zoo_factory(plan.model)
    model = apply_structure(build(factory, plan.model), plan)
    try:
        stored = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {exc}") from exc
    try:
        state = matched_state(
            model, stored, f"the tensors in {weights}", ArtifactError, exact_dtypes=True
        )
    except ArtifactError as exc:
        raise ArtifactError(
            f"{exc} (the plan's schemes decide what the file holds: was plan.json edited?)"
        ) from exc
    model.load_state_dict(state, strict=True)
    check_tensors(model, plan, str(weights))
    return model.eval(), plan

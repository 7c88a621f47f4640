"""Artifacts: a directory with `model.safetensors` (the compressed model's tensors) and `plan.json`.

Every file is written atomically (temp file in the same directory, fsync, rename), weights first and
the plan last; the plan records the weights file's size and SHA-256, so a torn or replaced artifact is
detected on load instead of giving wrong outputs. Nothing is ever unpickled.

An artifact is untrusted input: loading one never runs code it names. The float architecture comes
from the caller's `model_factory`, or, for a plan made from a zoo model, from the zoo (allot's own
code); a plan that names a model file is refused unless the caller passes the factory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn

from allot.apply import apply_structure
from allot.exceptions import ArtifactError, PlanError
from allot.files import atomic_write, read_json, save_weights
from allot.plan import Plan
from allot.source import build, zoo_factory

WEIGHTS = "model.safetensors"
PLAN = "plan.json"


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def save(model: nn.Module, plan: Plan, directory: str | Path) -> Path:
    """Write a compressed model and its plan as an artifact directory; returns the directory."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / WEIGHTS
        save_weights(model, weights)
        plan.metadata["artifact"] = {
            "file": WEIGHTS,
            "bytes": weights.stat().st_size,
            "sha256": _digest(weights),
        }
        atomic_write(directory / PLAN, plan.dumps().encode())
    except OSError as exc:
        raise ArtifactError(
            f"cannot write the artifact to {directory}: {exc.strerror or exc}"
        ) from exc
    return directory


def read_plan(directory: str | Path) -> Plan:
    """The validated plan of an artifact directory (or of a plan.json path)."""
    path = Path(directory)
    if path.is_dir():
        path = path / PLAN
    if not path.exists():
        raise ArtifactError(
            f"{path} does not exist; pass an artifact directory made by `allot compress`"
        )
    try:
        return Plan.from_json(read_json(path, PlanError))
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from exc


def load(
    directory: str | Path, model_factory: Callable[[], nn.Module] | None = None
) -> tuple[nn.Module, Plan]:
    """Rebuild a compressed model from an artifact, without the original weights.

    `model_factory` builds the float architecture (any weights; they are all overwritten). When
    omitted, the plan must name a zoo model, whose architecture the zoo builds: a plan that names
    a model file is refused, since loading never runs code an artifact names. Returns (model in
    eval mode, plan).
    """
    directory = Path(directory)
    plan = read_plan(directory)
    weights = directory / WEIGHTS
    info = plan.metadata.get("artifact", {})
    if not weights.exists():
        raise ArtifactError(f"{weights} is missing; the artifact is incomplete")
    if info.get("bytes") != weights.stat().st_size or info.get("sha256") != _digest(weights):
        raise ArtifactError(
            f"{weights} does not match {directory / PLAN} (truncated, corrupt or replaced); "
            "compress again"
        )
    factory = model_factory or zoo_factory(plan.model)
    model = apply_structure(build(factory, plan.model), plan)
    try:
        load_model(model, weights, strict=True)
    except (RuntimeError, SafetensorError) as exc:
        raise ArtifactError(
            f"{weights} does not fit the model: {str(exc).splitlines()[0]}"
        ) from exc
    return model.eval(), plan

"""Artifacts: a directory with `model.safetensors` (the compressed model's tensors) and `plan.json`.

Every file is written atomically (temp file in the same directory, fsync, rename), weights first and
the plan last; the plan records the weights file's size and SHA-256, so a torn or replaced artifact is
detected on load instead of giving wrong outputs. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from allot.apply import apply_structure
from allot.exceptions import ArtifactError
from allot.plan import Plan
from allot.source import architecture_factory, build

WEIGHTS = "model.safetensors"
PLAN = "plan.json"


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temp file in `path`'s directory (same file system, so rename is atomic), with the
    permissions an ordinary new file would get (mkstemp's are owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def save_weights(model: nn.Module, path: Path) -> None:
    """Atomically save a model's state dict as safetensors (shared tensors stored once)."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        save_model(model, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    return Plan.loads(path.read_text())


def load(
    directory: str | Path, model_factory: Callable[[], nn.Module] | None = None
) -> tuple[nn.Module, Plan]:
    """Rebuild a compressed model from an artifact, without the original weights.

    `model_factory` builds the float architecture (any weights; they are all overwritten); when
    omitted, the plan's model reference (zoo name or FILE.py:FACTORY) builds it. Returns (model in eval mode, plan).
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
    factory = model_factory or architecture_factory(plan.model)
    model = apply_structure(build(factory, plan.model), plan)
    try:
        load_model(model, weights, strict=True)
    except (RuntimeError, SafetensorError) as exc:
        raise ArtifactError(
            f"{weights} does not fit the model: {str(exc).splitlines()[0]}"
        ) from exc
    return model.eval(), plan

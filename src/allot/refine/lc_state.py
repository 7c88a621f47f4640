"""LC checkpoints: the whole state of an LC run after a step, saved atomically, so `resume`
continues to the result an uninterrupted run reaches.

A checkpoint directory holds `lc-state.json` and the tensors it names, `lc-state-<step>.safetensors`:
the free float model's state dict (`free/<key>`), each layer's compressed module (Theta,
`theta/<layer>/<key>`), the multipliers (`lambda/<layer>`), and the torch random state
(`rng/torch`, plus numpy's key array `rng/numpy`). The JSON records the step reached, the
settings and the plan the run started from (a resume with others is refused), each layer's current
scheme (rank selection changes them), the history of measurements, Python's and numpy's other
random state, and the tensors file's size and SHA-256. The tensors are written first under a
name of their own, then the JSON (atomically), then older tensor files are removed: a run killed
at any point leaves a JSON that names a complete tensors file. The optimiser is created afresh
for every L step (as the LC reference implementation does), so a step boundary carries no
optimiser state. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from allot import distributed
from allot.exceptions import ArtifactError, ConfigError
from allot.files import atomic_write, read_json, write_json
from allot.schemes import Scheme, scheme_from_json

STATE = "lc-state.json"
FORMAT = "allot-lc-state"
VERSION = 1


@dataclass
class LCState:
    """An LC run after `step` completed steps (0: direct compression only)."""

    step: int
    free: dict[str, Tensor]
    theta: dict[str, dict[str, Tensor]]
    multipliers: dict[str, Tensor]
    schemes: dict[str, Scheme]
    history: list[dict[str, Any]]


def random_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The process's torch, numpy and Python random states as tensors and JSON values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    tensors = {
        "rng/torch": torch.get_rng_state(),
        "rng/numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
    }
    values = {
        "numpy": [kind, int(position), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, values


def restore_random_state(tensors: dict[str, Tensor], values: dict[str, Any]) -> None:
    """Set the random states `random_state` recorded."""
    torch.set_rng_state(tensors["rng/torch"])
    kind, position, has_gauss, cached = values["numpy"]
    keys = tensors["rng/numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, position, has_gauss, cached))
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(directory: Path, state: LCState, identity: dict[str, Any]) -> None:
    """Write `state` to `directory` (see the module docstring); `identity` (settings and starting
    plan, JSON) is what a resume must match. Under `torchrun` only rank 0 writes (every rank
    holds the same state)."""
    if not distributed.is_main():
        return
    directory.mkdir(parents=True, exist_ok=True)
    rng_tensors, rng_values = random_state()
    tensors = {f"free/{k}": v for k, v in state.free.items()}
    for name, module_state in state.theta.items():
        tensors.update({f"theta/{name}/{k}": v for k, v in module_state.items()})
    tensors.update({f"lambda/{k}": v for k, v in state.multipliers.items()})
    tensors.update(rng_tensors)
    data = save({k: v.detach().contiguous() for k, v in tensors.items()})
    name = f"lc-state-{state.step}.safetensors"
    atomic_write(directory / name, data)
    write_json(
        directory / STATE,
        {
            "format": FORMAT,
            "version": VERSION,
            "step": state.step,
            "identity": identity,
            "schemes": {k: v.to_json() for k, v in state.schemes.items()},
            "history": state.history,
            "random": rng_values,
            "tensors": {
                "file": name,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            },
        },
    )
    for old in directory.glob("lc-state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_state(directory: Path, identity: dict[str, Any]) -> LCState | None:
    """The state saved in `directory` (None when it holds none), with the random states
    restored. `ConfigError` when it was saved by a run with other settings or another plan,
    `ArtifactError` when it is damaged."""
    path = directory / STATE
    if not path.exists():
        return None
    saved = read_json(path, ArtifactError)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an allot LC checkpoint")
    if saved.get("version") != VERSION:
        raise ArtifactError(f"{path}: this allot reads LC checkpoints of version {VERSION}")
    if saved.get("identity") != identity:
        differ = sorted(
            key
            for key in set(identity) | set(saved.get("identity", {}))
            if identity.get(key) != saved.get("identity", {}).get(key)
        )
        raise ConfigError(
            f"the LC checkpoint in {directory} was made with another {', '.join(differ)}; "
            "start afresh without resuming, or resume with the same plan and settings"
        )
    info = saved["tensors"]
    tensors_path = directory / str(info["file"])
    try:
        data = tensors_path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {tensors_path}: {exc.strerror or exc}") from exc
    if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise ArtifactError(f"{tensors_path} does not match {path}: the checkpoint is damaged")
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{tensors_path} is not a readable safetensors file: {exc}") from exc
    schemes = {
        name: scheme_from_json(value, f"{path}: schemes.{name}")
        for name, value in saved["schemes"].items()
    }
    theta: dict[str, dict[str, Tensor]] = {name: {} for name in schemes}
    free, multipliers = {}, {}
    for key, value in tensors.items():
        group, _, rest = key.partition("/")
        if group == "free":
            free[rest] = value
        elif group == "lambda":
            multipliers[rest] = value
        elif group == "theta":
            layer, _, entry = rest.rpartition("/")
            theta[layer][entry] = value
    restore_random_state(tensors, saved["random"])
    return LCState(int(saved["step"]), free, theta, multipliers, schemes, saved["history"])

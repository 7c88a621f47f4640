"""Where a float model comes from: a zoo name, or a user's Python file exposing a factory plus a
safetensors weights file. A model reference is the string stored in a plan's `model` field."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from allot.exceptions import ModelError


def is_file_reference(reference: str) -> bool:
    """True for `path/to/file.py:factory` references."""
    return ".py:" in reference


def file_factory(reference: str) -> Callable[[], nn.Module]:
    """Import `factory` from `path/to/file.py:factory` (the user's own code runs here)."""
    path_text, _, name = reference.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    module_name = f"allot_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelError(f"{path} has no callable {name!r}; pass FILE.py:FACTORY")
    return factory


def build(factory: Callable[[], nn.Module], reference: str) -> nn.Module:
    """Call a model factory; its failures become `ModelError`."""
    try:
        model = factory()
    except Exception as exc:
        raise ModelError(f"the factory {reference} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"the factory {reference} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors state dict into `model`; `ModelError` naming what does not match."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file: {exc}") from exc
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise ModelError(f"weights in {path} do not match the model: {'; '.join(parts)}")
    model.load_state_dict(state)
    return model.eval()


def float_model(reference: str, weights: str | Path | None = None) -> nn.Module:
    """The trained float model for a reference: a zoo model with its checkpoint, or a file factory
    with `weights` (required for file references)."""
    if is_file_reference(reference):
        if weights is None:
            raise ModelError("a model given as FILE.py:FACTORY needs --weights W.safetensors")
        return load_weights(build(file_factory(reference), reference), weights)
    from allot.zoo import create_model

    model = create_model(reference)
    return load_weights(model, weights) if weights is not None else model


def architecture_factory(reference: str) -> Callable[[], nn.Module]:
    """A factory of the float architecture (weights not loaded), for rebuilding artifacts."""
    if is_file_reference(reference):
        factory = file_factory(reference)
        return lambda: build(factory, reference)
    from allot.zoo import create_model

    return lambda: create_model(reference, pretrained=False)

"""Where models and data come from: a zoo name, or the user's own files.

A model is a zoo name, or a user's Python file exposing a factory (`FILE.py:FACTORY`) plus a
safetensors weights file; the reference is the string stored in a plan's `model` field. Data are a
zoo data set's name, a user's Python file exposing a data factory (`FILE.py:FACTORY`, returning an
`allot.Data`, or an iterable of batches to pair with a named loss), or a tensor file (`.npz` or
`.safetensors`) holding `inputs` and, for supervised losses, `targets`.

The user's own files are trusted (they named them on the command line); a reference read from an
artifact is not, and `zoo_factory` never imports a file for it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from allot import hf
from allot.data import Data, Distill, as_data, loader_evaluation, supervised
from allot.exceptions import AllotError, ArtifactError, DataError, ModelError, shown
from allot.state import matched_state

LOSSES = ("cross-entropy", "mse", "distill")
"""Losses a tensor file or a factory returning plain batches can be paired with."""


def is_file_reference(reference: str) -> bool:
    """True for `path/to/file.py:factory` references."""
    return ".py:" in reference


def file_factory(reference: str, error: type[AllotError] = ModelError) -> Callable[..., Any]:
    """Import `factory` from `path/to/file.py:factory` (the user's own code runs here). As when
    Python runs a script, the file's folder goes on the import path, so it may import its
    neighbours (a model file its data file, say)."""
    path_text, _, name = reference.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise error(f"file {path} does not exist")
    module_name = f"allot_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise error(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    writes_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave no __pycache__ beside the user's file
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise error(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.dont_write_bytecode = writes_bytecode
    factory = getattr(module, name, None)
    if not callable(factory):
        raise error(f"{path} has no callable {name!r}; pass FILE.py:FACTORY")
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
    """Load a safetensors state dict into `model` (tied tensors may be stored once, as
    `safetensors.torch.save_model` writes them); `ModelError` naming what does not match."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist or is not a regular file")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file: {exc}") from exc
    model.load_state_dict(
        matched_state(model, state, f"the weights in {path}", ModelError, exact_dtypes=False)
    )
    return model.eval()


def float_model(reference: str, weights: str | Path | None = None) -> nn.Module:
    """The trained float model for a reference: a zoo model with its checkpoint, a Hugging Face
    model directory (`hf:PATH`), or a file factory with `weights` (required for file
    references)."""
    if hf.is_hf_reference(reference):
        if weights is not None:
            raise ModelError("an hf:PATH model brings its own weights; drop --weights")
        return hf.load_model(reference)
    if is_file_reference(reference):
        if weights is None:
            raise ModelError("a model given as FILE.py:FACTORY needs --weights W.safetensors")
        return load_weights(build(file_factory(reference), reference), weights)
    from allot.zoo import create_model

    model = create_model(reference)
    return load_weights(model, weights) if weights is not None else model


def zoo_factory(reference: str) -> Callable[[], nn.Module]:
    """The architecture factory (weights not loaded) of the zoo model a plan names, for rebuilding
    its artifact. `ArtifactError` for anything else: a plan is untrusted, and a model file it
    names is never imported; the caller passes that factory."""
    if hf.is_hf_reference(reference):
        raise ArtifactError(
            f"the artifact was made from the Hugging Face model {reference.removeprefix('hf:')}: "
            "rebuild it from its own hf/ folder (allot.load(DIR, allot.hf.architecture(DIR / "
            "'hf')), or with the allot CLI, which does)"
        )
    if is_file_reference(reference):
        raise ArtifactError(
            f"the artifact was made from the model file {shown(reference.rpartition(':')[0])}, and "
            "loading an artifact never runs code it names: pass the factory yourself "
            "(allot.load(DIR, model_factory=...), or --model FILE.py:FACTORY)"
        )
    from allot.zoo import MODELS, create_model

    if reference not in MODELS:
        raise ArtifactError(
            f"the artifact names model {reference!r:.60}, which is not a zoo model: pass its "
            "factory (allot.load(DIR, model_factory=...), or --model FILE.py:FACTORY)"
        )
    return lambda: create_model(reference, pretrained=False)


def zoo_data(name: str, calibration: int, seed: int) -> Data:
    """A zoo data set under the data contract (`calibration` samples drawn with `seed`)."""
    from allot.zoo import get_dataset

    return get_dataset(name, calibration_size=calibration, seed=seed).to_data()


def zoo_data_of(model: str, calibration: int, seed: int) -> Data:
    """The data set a zoo model was trained on, under the data contract."""
    from allot.zoo import get_entry

    return zoo_data(get_entry(model).dataset, calibration, seed)


def is_tensor_file(reference: str) -> bool:
    return reference.endswith((".npz", ".safetensors"))


def read_tensor_file(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a `.npz` (never unpickled) or `.safetensors` file, by name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {k: torch.from_numpy(np.array(archive[k])) for k in archive.files}
        return load_file(path)
    except (OSError, ValueError, SafetensorError) as exc:
        raise DataError(f"{path} is not a readable {path.suffix} file: {exc}") from exc


def _loss(name: str | None, model: nn.Module, where: str) -> Any:
    if name is None:
        raise DataError(
            f"{where} gives plain batches: name their loss with --loss ({', '.join(LOSSES)})"
        )
    if name == "cross-entropy":
        return supervised(F.cross_entropy)
    if name == "mse":
        return supervised(F.mse_loss)
    if name == "distill":
        return Distill(model)
    raise DataError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")


def tensor_batches(
    path: str | Path, loss: str | None, limit: int | None, batch_size: int
) -> list[tuple[Tensor, ...]]:
    """Batches of a tensor file: (inputs, targets) pairs, or (inputs,) when the loss needs no
    targets (`distill`); at most `limit` samples. `DataError` naming what is missing or does not
    fit."""
    tensors = read_tensor_file(path)
    if "inputs" not in tensors:
        raise DataError(
            f"{path} holds no tensor named 'inputs' (it has: {', '.join(sorted(tensors)) or 'none'})"
        )
    inputs = tensors["inputs"]
    if inputs.dim() == 0 or len(inputs) == 0:
        raise DataError(f"{path}: 'inputs' holds no samples")
    if inputs.is_floating_point():
        inputs = inputs.float()
    columns = [inputs]
    if loss != "distill":
        if "targets" not in tensors:
            raise DataError(f"{path} holds no 'targets'; add them, or use --loss distill")
        targets = tensors["targets"]
        if targets.dim() == 0 or len(targets) != len(inputs):
            raise DataError(
                f"{path}: 'targets' has {len(targets) if targets.dim() else 0} samples but "
                f"'inputs' has {len(inputs)}"
            )
        columns.append(targets.long() if loss == "cross-entropy" else targets.float())
    count = len(inputs) if limit is None else min(limit, len(inputs))
    return [
        tuple(c[start : start + batch_size] for c in columns)
        for start in range(0, count, batch_size)
    ]


def user_data(
    reference: str,
    model: nn.Module,
    loss: str | None,
    *,
    calibration: int | None,
    held_out: str | None = None,
    batch_size: int = 64,
) -> Data:
    """The user's data: a data factory `FILE.py:FACTORY` or a tensor file (first `calibration`
    samples), with the held-out tensor file `held_out` as its evaluation when given."""
    if is_file_reference(reference):
        made = file_factory(reference, DataError)()
        data = (
            as_data(made)
            if loss is None
            else Data(made, _loss(loss, model, reference), name=reference)
        )
    elif is_tensor_file(reference):
        batches = tensor_batches(reference, loss, calibration, batch_size)
        data = Data(batches, _loss(loss, model, reference), name=Path(reference).name)
    else:
        raise DataError(
            f"--data {reference!r}: expected a zoo data set, FILE.py:FACTORY, or a .npz/.safetensors file"
        )
    if held_out is None:
        return data
    if not is_tensor_file(held_out):
        raise DataError(f"--held-out {held_out!r}: expected a .npz or .safetensors file")
    evaluate = loader_evaluation(
        tensor_batches(held_out, loss, None, batch_size),
        data.loss,
        data.inputs,
        accuracy=loss == "cross-entropy",
    )
    return dataclasses.replace(data, evaluate=evaluate)

"""Train zoo models from their recipes and write checkpoints.

Training is deterministic for a given recipe seed on a given machine: the seed fixes initialisation
(`torch.manual_seed` before the model is built) and the data order (a dedicated `torch.Generator`).
Reproduce a shipped checkpoint with `allot zoo train NAME` (the shipped ones were trained on CPU
with 2 torch threads).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file
from torch import nn

from allot.data import forward
from allot.exceptions import ConfigError, ModelError
from allot.zoo.data import get_dataset
from allot.zoo.registry import CHECKPOINT_DIR, TrainRecipe, get_entry


def _optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            nesterov=recipe.momentum > 0,
        )
    raise ConfigError(f"unknown optimizer {recipe.optimizer!r} in recipe; use 'adam' or 'sgd'")


def _recipe(name: str) -> TrainRecipe:
    recipe = get_entry(name).recipe
    if recipe is None:
        raise ModelError(f"zoo model {name!r} has no training recipe; it is not trained by allot")
    return recipe


def train_model(
    name: str, epochs: int | None = None, progress: bool = True
) -> tuple[nn.Module, dict[str, float]]:
    """Train zoo model `name` from scratch with its recipe (`epochs` overrides the recipe's).

    The learning rate follows a cosine schedule from the recipe's rate to zero over all steps.
    Returns the model in eval mode and its test metrics (the task's, e.g. `accuracy` as a fraction
    and `loss` in nats), plus `epochs` (as trained) and `train_seconds` (wall-clock seconds).
    `ModelError` for an unknown model or one without a recipe.
    """
    entry = get_entry(name)
    recipe = _recipe(name)
    epochs = recipe.epochs if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    dataset = get_dataset(entry.dataset)
    train = dataset.train
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)

    torch.manual_seed(recipe.seed)
    model = entry.build()
    optimizer = _optimizer(model, recipe)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(recipe.seed)

    start = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
    )
    with Progress(*columns, disable=not progress) as bar:
        task_id = bar.add_task(f"train {name}", total=epochs * steps_per_epoch, loss=float("nan"))
        model.train()
        for epoch in range(epochs):
            bar.update(task_id, description=f"train {name} epoch {epoch + 1}/{epochs}")
            order = torch.randperm(len(train), generator=shuffle)
            for step in range(steps_per_epoch):
                index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
                batch = train.subset(index)
                loss = dataset.task.loss(forward(model, batch.inputs), batch.targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(task_id, advance=1, loss=loss.item())
    seconds = time.perf_counter() - start

    metrics = dataset.task.evaluate(model, dataset, "test")
    metrics.update(epochs=float(epochs), train_seconds=seconds)
    return model.eval(), metrics


def _write_temp(path: Path, write: Callable[[Path], None]) -> Path:
    """Write to a temporary file beside `path` with `write(temp_path)`; return the temporary path.

    The caller moves it into place with `os.replace`; on failure the temporary file is removed.
    """
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temp))
        os.chmod(temp, 0o644)  # mkstemp makes owner-only files; checkpoints are package data
    except BaseException:
        os.unlink(temp)
        raise
    return Path(temp)


def save_checkpoint(
    name: str, model: nn.Module, metrics: dict[str, float], directory: Path = CHECKPOINT_DIR
) -> Path:
    """Write `<name>.safetensors` (the state dict) and `<name>.json` (metrics, recipe and torch
    version) into `directory`; returns the path of the weights.

    Both files are first written to temporary files in `directory` and then moved into place with
    `os.replace`, so a crash or error never leaves a truncated checkpoint behind.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / f"{name}.safetensors"
    info_path = directory / f"{name}.json"
    entry = get_entry(name)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    info = {
        "model": name,
        "dataset": entry.dataset,
        "metrics": metrics,
        "recipe": asdict(entry.recipe) if entry.recipe is not None else None,
        "torch": torch.__version__,
    }

    def write_info(path: Path) -> None:
        path.write_text(json.dumps(info, indent=2) + "\n")

    weights_temp = _write_temp(weights_path, lambda path: save_file(state, str(path)))
    try:
        info_temp = _write_temp(info_path, write_info)
    except BaseException:
        os.unlink(weights_temp)
        raise
    os.replace(weights_temp, weights_path)
    os.replace(info_temp, info_path)
    return weights_path

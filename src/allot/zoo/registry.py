"""Registry of benchmark models, timm-style: `@register_model` adds a constructor, `create_model`
builds it with its trained weights.

Tiny `test-*` models are registered exactly like real ones so tests can parametrize over the
registry. Trained checkpoints ship as safetensors under `allot/zoo/checkpoints/`; `allot zoo train
NAME` reproduces them from the model's recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from allot.exceptions import ModelError
from allot.registry import Registry

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True)
class TrainRecipe:
    """How to train a zoo model from scratch: optimiser `adam` or `sgd`, learning rate, epochs,
    batch size, weight decay, and the seed that fixes initialisation and data order."""

    epochs: int
    lr: float
    batch_size: int = 128
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class ZooModel:
    """A registered model: architecture constructor, its data set, and where its weights come from.

    `pretrained`, when set, loads weights from elsewhere (e.g. a package) into a built model, for
    models not trained by allot.
    """

    name: str
    build: Callable[[], nn.Module]
    dataset: str
    description: str = ""
    recipe: TrainRecipe | None = None
    pretrained: Callable[[nn.Module], None] | None = None

    @property
    def checkpoint(self) -> Path:
        return CHECKPOINT_DIR / f"{self.name}.safetensors"


MODELS: Registry[ZooModel] = Registry("zoo model", ModelError)


def register_model(
    name: str,
    dataset: str,
    description: str = "",
    recipe: TrainRecipe | None = None,
    pretrained: Callable[[nn.Module], None] | None = None,
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator: register a model constructor under `name`."""

    def wrap(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        MODELS.add(name, ZooModel(name, build, dataset, description, recipe, pretrained))
        return build

    return wrap


def get_entry(name: str) -> ZooModel:
    """The registry entry for `name`; `ModelError` listing the known names otherwise."""
    return MODELS[name]


def create_model(name: str, pretrained: bool = True) -> nn.Module:
    """Build a zoo model in eval mode; with `pretrained`, load its trained weights.

    `ModelError` when the name is unknown or the checkpoint is missing (with the command that makes it).
    """
    entry = get_entry(name)
    model = entry.build()
    if pretrained:
        if entry.pretrained is not None:
            entry.pretrained(model)
        elif entry.checkpoint.exists():
            model.load_state_dict(load_file(entry.checkpoint))
        else:
            raise ModelError(
                f"no trained checkpoint for {name!r} at {entry.checkpoint}; "
                f"run `allot zoo train {name}` to make it"
            )
    return model.eval()

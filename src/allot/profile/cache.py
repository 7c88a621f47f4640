"""An on-disk cache of profile results, so a second run on the same model and data redoes nothing.

An entry is a dict of named tensors stored as one safetensors file (never pickled), written
atomically, under a key that is the SHA-256 of everything the result depends on: the model's weights
(names, dtypes, shapes and bytes), the calibration batches, the loss, and the settings of the
computation. Any change to one of them gives a new key, so entries never go stale; they are only
ever added. The directory is `$ALLOT_CACHE`, else `~/.cache/allot`; delete it to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from allot.io import atomic_write
from allot.zoo.data import Batch


def default_directory() -> Path:
    """`$ALLOT_CACHE` when set, else `~/.cache/allot`."""
    return Path(os.environ.get("ALLOT_CACHE") or Path.home() / ".cache" / "allot")


class Fingerprint:
    """An incremental SHA-256 over tensors and JSON-able values; `hexdigest()` is the key."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def value(self, value: Any) -> Fingerprint:
        self._sha.update(json.dumps(value, sort_keys=True, default=str).encode())
        return self

    def tensor(self, tensor: Tensor) -> Fingerprint:
        data = tensor.detach().cpu().contiguous()
        self.value([str(data.dtype), list(data.shape)])
        self._sha.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return self

    def model(self, model: nn.Module) -> Fingerprint:
        for name, tensor in model.state_dict().items():
            self.value(name).tensor(tensor)
        return self

    def batches(self, batches: Iterable[Batch]) -> Fingerprint:
        for inputs, targets in batches:
            items = sorted(inputs.items()) if isinstance(inputs, dict) else [("", inputs)]
            for name, tensor in items:
                self.value(name).tensor(tensor)
            self.tensor(targets)
        return self

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class Cache:
    """Tensor dicts on disk by key; `Cache(None)` is a disabled cache that stores nothing."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, Tensor] | None:
        """The entry under `key`; None when absent or disabled, or (with a warning) unreadable."""
        if self.directory is None:
            return None
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return load_tensors(path.read_bytes())
        except (SafetensorError, OSError) as exc:
            warnings.warn(f"cache entry {path} is unreadable ({exc}); recomputing it", stacklevel=2)
            return None

    def put(self, key: str, tensors: dict[str, Tensor]) -> None:
        """Store `tensors` under `key` (atomically; nothing when disabled)."""
        if self.directory is None:
            return
        data = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        atomic_write(self._path(key), save_tensors(data))

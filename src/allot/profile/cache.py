"""An on-disk cache of profile results, so a second run on the same model and data redoes nothing.

An entry is a dict of named tensors stored as one safetensors file (never pickled), written
atomically, under a key that is the SHA-256 of the *content* everything the result depends on: the
model's weights (names, dtypes, shapes and bytes), the calibration batches, the loss (its code, see
`loss_identity`), and the settings of the computation. No memory address or object identity enters
a key, so another process on the same inputs finds the same entries; any change to an input gives
a new key, so entries never go stale.

Entries are untrusted on reading: each carries the SHA-256 of its tensors in its header and one
whose tensors do not match (torn, altered, or not written by allot), that holds NaN or inf (never
stored), or whose names and shapes are not what the profile stores there, is ignored with a
warning and recomputed. The checksum detects damage, not forgery: anyone who can write the cache
directory can write a matching one; such an entry can only make statistics wrong, since entries
are plain tensors (safetensors, never unpickled). The cache is bounded: after each write, the least recently used entries are deleted
until it holds at most `$ALLOT_CACHE_MAX_MB` megabytes (default 2048). A cache directory that cannot
be written (not a directory, no permission, a full disk) disables the cache with one warning: it
only ever saves time, so it never stops a run. Under `torchrun` every process reads the cache and
only rank 0 writes it (`allot.distributed`).

The directory is `$ALLOT_CACHE`, else `~/.cache/allot`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from allot import distributed
from allot.data import Data
from allot.exceptions import ConfigError
from allot.files import atomic_write

DEFAULT_MAX_MB = 2048
MAX_ENTRY_BYTES = 8 * 2**30


def default_directory() -> Path:
    """`$ALLOT_CACHE` when set, else `~/.cache/allot`."""
    return Path(os.environ.get("ALLOT_CACHE") or Path.home() / ".cache" / "allot")


def _tensor_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class Fingerprint:
    """An incremental SHA-256 over tensors and JSON-able values; `hexdigest()` is the key."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def value(self, value: Any) -> Fingerprint:
        self._sha.update(json.dumps(value, sort_keys=True, default=str).encode())
        return self

    def tensor(self, tensor: Tensor) -> Fingerprint:
        data = tensor.detach()
        self.value([str(data.dtype), list(data.shape)])
        self._sha.update(_tensor_bytes(data))
        return self

    def model(self, model: nn.Module) -> Fingerprint:
        for name, tensor in model.state_dict().items():
            self.value(name).tensor(tensor)
        return self

    def structure(self, value: Any) -> Fingerprint:
        """Tensors, numbers and strings in nested tuples, lists and dicts, by content; `TypeError`
        for anything else (its content cannot be read without trusting its `repr`)."""
        if isinstance(value, Tensor):
            return self.value("tensor").tensor(value)
        if isinstance(value, dict):
            self.value(["dict", len(value)])
            for key in sorted(value, key=str):
                self.value(str(key)).structure(value[key])
            return self
        if isinstance(value, (tuple, list)):
            self.value([type(value).__name__, len(value)])
            for item in value:
                self.structure(item)
            return self
        if value is None or isinstance(value, (bool, int, float, str)):
            return self.value(value)
        raise TypeError(f"cannot fingerprint a {type(value).__name__} by its content")

    def batches(self, data: Data) -> Fingerprint:
        """The calibration batches and the loss of the data contract."""
        for batch in data.batches():
            self.structure(batch)
        return self.value(loss_identity(data.loss))

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def loss_identity(loss: Any) -> str:
    """A content description of a loss function for cache keys, stable across processes.

    A loss may name itself with a string attribute `identity` (allot's `supervised` and `Distill`
    do). Otherwise: its qualified name and, for plain functions, a hash of its byte code, constants
    and closure values; for a bound method, its owner's class and public attributes (a dataclass
    task, say); for `functools.partial`, the function and its arguments."""
    identity = getattr(loss, "identity", None)
    if isinstance(identity, str):
        return identity
    func = getattr(loss, "func", None)
    if func is not None and hasattr(loss, "args"):  # functools.partial
        return f"partial({loss_identity(func)}, {_plain(loss.args)}, {_plain(loss.keywords)})"
    owner = getattr(loss, "__self__", None)
    if owner is not None and isinstance(loss, types.MethodType):
        state = {k: v for k, v in vars(owner).items() if not k.startswith("_")}
        return f"{_qualified(loss)} of {_qualified(type(owner))} {_plain(state)}"
    code = getattr(loss, "__code__", None)
    if code is None:  # a callable object without code of its own: its class and public state
        state = {k: v for k, v in getattr(loss, "__dict__", {}).items() if not k.startswith("_")}
        return f"{_qualified(type(loss))} {_plain(state)}"
    closure = [cell.cell_contents for cell in (loss.__closure__ or ())]
    return f"{_qualified(loss)} {_code_digest(code)} {_plain(closure)}"


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _code_digest(code: types.CodeType) -> str:
    sha = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        sha.update(
            _code_digest(const).encode()
            if isinstance(const, types.CodeType)
            else repr(const).encode()
        )
    sha.update(repr(code.co_names).encode())
    return sha.hexdigest()[:16]


def _plain(value: Any) -> str:
    """JSON of plain values; other objects by their type (never their repr, which may hold a
    memory address); functions by their identity."""

    def default(obj: Any) -> str:
        if callable(obj):
            return loss_identity(obj)
        if isinstance(obj, Tensor):
            return hashlib.sha256(_tensor_bytes(obj)).hexdigest()[:16]
        return _qualified(type(obj))

    return json.dumps(value, sort_keys=True, default=default)


def _checksum(tensors: dict[str, Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        sha.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        sha.update(_tensor_bytes(tensor))
    return sha.hexdigest()


def _max_bytes() -> int:
    """`$ALLOT_CACHE_MAX_MB` (default 2048) in bytes; `ConfigError` when it is not a number >= 0."""
    text = os.environ.get("ALLOT_CACHE_MAX_MB", str(DEFAULT_MAX_MB))
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = math.nan
    if not 0 <= megabytes < 2**40:
        raise ConfigError(
            f"ALLOT_CACHE_MAX_MB must be a number of megabytes >= 0, got {text!r:.40}"
        )
    return int(megabytes * 2**20)


def _finite(tensors: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


class Cache:
    """Tensor dicts on disk by key; `Cache(None)` is a disabled cache that stores nothing."""

    def __init__(self, directory: Path | None, max_bytes: int | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes if max_bytes is not None else _max_bytes()

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, Tensor] | None:
        """The entry under `key`; None when absent or disabled, or (with a warning) unreadable,
        not matching its checksum, or holding NaN or inf."""
        if self.directory is None:
            return None
        path = self._path(key)
        try:
            if not path.is_file():
                return None
            if path.stat().st_size > MAX_ENTRY_BYTES:
                raise OSError("entry too large")
            data = path.read_bytes()
            tensors = load_tensors(data)
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            stored = header.get("__metadata__", {}).get("sha256")
        except (SafetensorError, OSError, ValueError, AttributeError) as exc:
            warnings.warn(f"cache entry {path} is unreadable ({exc}); recomputing it", stacklevel=2)
            return None
        if stored != _checksum(tensors):
            warnings.warn(f"cache entry {path} fails its checksum; recomputing it", stacklevel=2)
            return None
        if not _finite(tensors):
            warnings.warn(f"cache entry {path} holds NaN or inf; recomputing it", stacklevel=2)
            return None
        with contextlib.suppress(OSError):  # a read-only cache is still a cache
            os.utime(path)  # recently used: evicted last
        return tensors

    def put(self, key: str, tensors: dict[str, Tensor]) -> None:
        """Store `tensors` under `key` (atomically; nothing when disabled), then evict the least
        recently used entries beyond the size bound. A write that fails disables the cache with
        a warning. Only rank 0 writes under `torchrun`."""
        if self.directory is None or not distributed.is_main():
            return
        data = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        if not _finite(data):  # never a valid entry: the next run computes it again
            return
        try:
            atomic_write(self._path(key), save_tensors(data, metadata={"sha256": _checksum(data)}))
            self._evict()
        except OSError as exc:
            warnings.warn(
                f"the profile cache {self.directory} cannot be written ({exc.strerror or exc}); "
                "continuing without it (set ALLOT_CACHE to a writable directory)",
                stacklevel=2,
            )
            self.directory = None

    def _evict(self) -> None:
        assert self.directory is not None
        entries = []
        for path in self.directory.glob("??/*.safetensors"):
            try:
                info = path.stat()
            except OSError:
                continue
            entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

"""Atomic writes and safe reads: the only place allot touches files directly.

Writes go to a temp file in the target's directory (same file system), are fsynced, and replace the
target by rename, so a reader sees the old file or the new one, never a torn one; the new file gets
the permissions an ordinary new file would (umask applied). Reads accept regular files only, up to
a size limit, so a FIFO, a device such as /dev/zero or a multi-gigabyte file passed as a plan fails
at once with a clear message instead of hanging or exhausting memory.

A leaf module: it imports nothing of allot but its exceptions.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

from allot.exceptions import AllotError

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file (plan, evaluation) allot reads, in bytes."""


def temp_beside(path: Path) -> tuple[int, str]:
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
    fd, tmp = temp_beside(path)
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
    """Atomically write `data` as indented JSON (UTF-8)."""
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def save_weights(model: nn.Module, path: Path) -> None:
    """Atomically save a model's state dict as safetensors (tied tensors stored once)."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        save_model(model, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_regular(path: Path, max_bytes: int, error: type[AllotError] = AllotError) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes`; `error` (one line,
    naming the file) otherwise. Special files are refused before they are opened for reading."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path} is not a regular file")
    if info.st_size > max_bytes:
        raise error(f"{path} is {info.st_size:,} bytes, more than the {max_bytes:,} allowed")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise error(f"{path} grew past {max_bytes:,} bytes while being read")
    return data


def read_json(
    path: Path, error: type[AllotError] = AllotError, max_bytes: int = MAX_JSON_BYTES
) -> Any:
    """Parse a JSON file (a regular UTF-8 file of at most `max_bytes`); `error` naming the file
    when it cannot be read, is not UTF-8, is not JSON or nests too deeply to parse."""
    data = read_regular(path, max_bytes, error)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise error(f"{path} nests JSON too deeply to be read") from exc

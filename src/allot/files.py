"""Atomic writes and safe reads: the only place allot touches files directly.

Writes go to a temp file in the target's directory (same file system), are fsynced, and replace the
target by rename, so a reader sees the old file or the new one, never a torn one; the new file gets
the permissions an ordinary new file would (umask applied). Reads accept regular files only, up to
a size limit, so a FIFO, a device such as /dev/zero or a multi-gigabyte file passed as a plan fails
at once with a clear message instead of hanging or exhausting memory.

A directory of several files that belong together (an artifact: weights, plan, evaluation, report,
plots) is written whole or not at all by `staged_directory`: everything goes into a fresh hidden
sibling, which then takes the target's place in one atomic exchange of the two names (Linux
`renameat2(RENAME_EXCHANGE)`; elsewhere two renames with SIGINT held back in between). An interrupt
at any point leaves the old directory or the new one, whole, under the target's name. The target
is checked before any long work: it may not be a file, hold files allot did not write, or contain
any of the command's inputs.

A leaf module: it imports nothing of allot but its exceptions.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

from allot.exceptions import AllotError

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file (plan, evaluation) allot reads, in bytes."""


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_beside(path: Path) -> tuple[int, str]:
    """A temp file in `path`'s directory (same file system, so rename is atomic), with the
    permissions an ordinary new file would get (mkstemp's are owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())
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
        # safetensors writes a file of its own, owner-only: give it an ordinary file's mode
        os.chmod(tmp, 0o666 & ~_umask())
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


_STAGING, _BACKUP = "allot-new", "allot-old"
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names `a` and `b` (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a directory tree; nothing if gone."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _owner_alive(path: Path) -> bool:
    """Whether the process whose id is in a staging or backup name (`.NAME.KIND-PID-xxxx`) runs."""
    try:
        pid = int(path.name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _recover(target: Path) -> None:
    """Tidy what a killed run left beside `target`: its staging directories go; a backup (the old
    directory, moved aside by the two-rename fallback) goes back in place when `target` is gone."""
    parent = target.parent
    if not parent.is_dir():
        return
    for kind in (_BACKUP, _STAGING):
        for left in sorted(parent.glob(glob.escape(f".{target.name}.") + f"{kind}-*")):
            if _owner_alive(left):
                continue
            if kind == _BACKUP and not os.path.lexists(target):
                os.rename(left, target)
            else:
                _remove(left)


def _check_characters(target: Path, error: type[AllotError]) -> None:
    if "\x00" in str(target):
        raise error(f"--out {str(target)!r} holds a NUL character, which no path can hold")


def check_output(
    target: Path,
    owned: Callable[[str], bool],
    inputs: Iterable[Path] = (),
    error: type[AllotError] = AllotError,
) -> Path:
    """Check an output directory before any long work; returns it as an absolute path.

    `error` when `target` is a file, a directory holding a name `owned` does not accept (allot
    never deletes what it did not write), the current directory or one above it, or the
    directory or a parent of any of `inputs` (the weights, model file or data a command reads):
    writing there would destroy them. A symlink at `target` is replaced, not followed, so what
    it points to is never touched."""
    _check_characters(target, error)
    target = Path(os.path.abspath(target))
    real = target.parent.resolve() / target.name
    if _inside(Path.cwd().resolve(), real):
        raise error(
            f"--out {target} is the current directory or holds it; the output replaces the "
            "whole directory: choose a new directory below it"
        )
    for given in inputs:
        if _inside(Path(given).resolve(), real):
            raise error(
                f"--out {target} contains the input {given}; writing the output there would "
                "replace it: choose another --out"
            )
    if target.is_symlink() or not os.path.lexists(target):
        return target
    if not target.is_dir():
        raise error(f"--out {target} is a file, not a directory; choose a directory")
    try:
        foreign = sorted(name for name in os.listdir(target) if not owned(name))
    except OSError as exc:
        raise error(f"cannot read --out {target}: {exc.strerror or exc}") from exc
    if foreign:
        raise error(
            f"--out {target} holds files allot does not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty directory"
        )
    return target


@contextlib.contextmanager
def staged_directory(
    target: Path,
    owned: Callable[[str], bool],
    inputs: Iterable[Path] = (),
    error: type[AllotError] = AllotError,
) -> Iterator[Path]:
    """A fresh directory beside `target` to write into; when the block ends without an exception
    it replaces `target` in one atomic step, and on an exception (an interrupt included) it is
    removed and `target` is left as it was. `target` is checked first (`check_output`), so call
    this before the long work: the staging directory's creation also proves the place writable."""
    _check_characters(target, error)
    _recover(Path(os.path.abspath(target)))
    target = check_output(target, owned, inputs, error)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.{_STAGING}-{os.getpid()}-", dir=target.parent)
        )
        os.chmod(staging, 0o777 & ~_umask())
    except OSError as exc:
        raise error(f"cannot write --out {target}: {exc.strerror or exc}") from exc
    try:
        yield staging
        _commit(staging, target)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise error(f"{exc.strerror or exc}{where}; {target} was left as it was") from exc
    finally:
        _remove(staging)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are held back and delivered as it ends. Python
    runs signal handlers in the main thread whichever thread the system gives the signal to, so
    this holds while torch's threads run, where blocking the signal in one thread would not."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = {n: signal.signal(n, lambda number, _frame: held.append(number)) for n in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in held:
            signal.raise_signal(number)


def _commit(staging: Path, target: Path) -> None:
    """Put `staging` in `target`'s place (the old one, if any, is removed afterwards). SIGINT and
    SIGTERM wait until the names are in place, so the two-rename fallback is never cut in half."""
    _fsync_directory(staging)
    with _signals_held():
        if not os.path.lexists(target):
            os.rename(staging, target)
        elif not _exchange(staging, target):
            backup = target.parent / f".{target.name}.{_BACKUP}-{os.getpid()}-0"
            os.rename(target, backup)
            os.rename(staging, target)
            os.rename(backup, staging)
        _fsync_directory(target.parent)

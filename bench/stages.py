"""Where a run's time and memory go, stage by stage, measured at the library's own stage
boundaries: a `Stopwatch` wraps named functions (a Profile's methods, the candidates stage, the
allocator, apply, ...) so that each call is timed, exclusive of the other watched stages it calls,
and credited with the resident-memory high-water mark reached while it ran.

Memory is the process's resident set (RSS), the memory that counts against a machine's RAM: PyTorch's
CPU tensors are allocated outside Python's allocator, so tracemalloc does not see them, and
PyTorch keeps no allocator statistics on CPU. On Linux the kernel's high-water mark (VmHWM) is
reset at every stage boundary (/proc/self/clear_refs), so each stage gets its own peak; elsewhere
every stage sees the process's peak so far (`resource.getrusage`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss() -> int:
    """The process's resident-set high-water mark in bytes (since start, or since the last
    `reset_peak`)."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS (Linux); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Stage:
    """One watched stage: calls, seconds spent in it (exclusive of watched stages it called),
    and the highest RSS reached while it (or anything it called) ran, in bytes."""

    calls: int = 0
    seconds: float = 0.0
    peak_rss: int = 0


@dataclass
class Stopwatch:
    """Exclusive time and peak RSS of watched functions, by label."""

    stages: dict[str, Stage] = field(default_factory=dict)
    peak: int = 0
    _stack: list[tuple[str, float]] = field(default_factory=list)
    _restore: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start = peak_rss()
        self.resets = reset_peak()

    def _mark(self) -> None:
        """Credit the high-water mark since the last mark to every running stage, and reset it."""
        high = peak_rss()
        self.peak = max(self.peak, high)
        for label, _ in self._stack:
            self.stages[label].peak_rss = max(self.stages[label].peak_rss, high)
        reset_peak()

    def wrap(self, function: Callable, label: str) -> Callable:
        """`function`, timed under `label`."""

        @functools.wraps(function)
        def timed(*args, **kwargs):
            self._mark()
            now = time.perf_counter()
            if self._stack:  # the caller's clock stops while this stage runs
                outer, started = self._stack[-1]
                self.stages[outer].seconds += now - started
            self.stages.setdefault(label, Stage()).calls += 1
            self._stack.append((label, now))
            try:
                return function(*args, **kwargs)
            finally:
                self._mark()
                _, started = self._stack.pop()
                now = time.perf_counter()
                self.stages[label].seconds += now - started
                if self._stack:
                    self._stack[-1] = (self._stack[-1][0], now)

        return timed

    def watch(self, owner: object, name: str, label: str) -> None:
        """Replace `owner.name` (a module's function or a class's method) by its timed wrapper
        until `restore`."""
        self.patch(owner, name, self.wrap(getattr(owner, name), label))

    def watch_lookup(self, owner: object, name: str, fields: tuple[str, ...], label: str) -> None:
        """Replace the lookup function `owner.name` (a registry getter returning a frozen
        dataclass: an allocator, an error model) by one whose results have their `fields`
        (functions) timed under `label`, until `restore`."""
        lookup = getattr(owner, name)

        def timed(*args, **kwargs):
            entry = lookup(*args, **kwargs)
            wrapped = {field: self.wrap(getattr(entry, field), label) for field in fields}
            return dataclasses.replace(entry, **wrapped)

        self.patch(owner, name, timed)

    def patch(self, owner: object, name: str, value: object) -> None:
        """Set `owner.name` to `value` until `restore`."""
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, value)
        self._restore.append(lambda: setattr(owner, name, original))

    def restore(self) -> None:
        """Undo every `watch`."""
        while self._restore:
            self._restore.pop()()

    def to_json(self) -> dict:
        self._mark()
        return {
            "per_stage_peaks": self.resets,
            "start_rss_bytes": self.start,
            "peak_rss_bytes": self.peak,
            "stages": {
                label: {"calls": s.calls, "seconds": s.seconds, "peak_rss_bytes": s.peak_rss}
                for label, s in self.stages.items()
            },
        }


def load() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (other processes inflate timings)."""
    return list(os.getloadavg())

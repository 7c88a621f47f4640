"""What a run costs the machine beyond its time: the process's peak resident memory."""

from __future__ import annotations

import resource
import sys


def peak_memory() -> int:
    """The most resident memory (RSS) this process has held since it started, in bytes: the
    memory that counts against a machine's RAM, PyTorch's tensors included (`getrusage`'s
    `ru_maxrss`, which Linux gives in KiB and macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

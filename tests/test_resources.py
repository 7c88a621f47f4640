"""The peak memory allot reports is the process's resident high-water mark, in bytes."""

from pathlib import Path

import pytest
import torch

from allot.resources import peak_memory

STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    line = next(x for x in STATUS.read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # /proc reports kB


@pytest.mark.skipif(not STATUS.exists(), reason="needs Linux's /proc/self/status")
def test_peak_memory_is_at_least_what_is_resident_and_grows_with_a_touched_tensor() -> None:
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    resident = _status_bytes("VmRSS")
    peak = peak_memory()
    # the kernel's per-thread page counters lag by a few pages: a tolerance far below the factor
    # of 1024 between KiB and bytes
    assert resident - 16 * 2**20 <= peak
    # in bytes, not KiB: no larger than the machine's memory
    total = next(
        int(x.split()[1]) * 1024
        for x in Path("/proc/meminfo").read_text().splitlines()
        if x.startswith("MemTotal:")
    )
    assert peak < total
    assert peak >= held.numel() * 4

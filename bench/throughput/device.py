"""What the device is, and how its work is timed and its memory measured (shared by the throughput benchmarks)."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

import torch


class Clock:
    """Wall time of device work: synchronises the device before reading the host clock."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """``torch.cuda.max_memory_allocated`` since the last reset; on CPU the process's peak RSS so far.

    RSS cannot be reset, so on CPU both arms report the same high-water mark of the whole process.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} logical cores)"
